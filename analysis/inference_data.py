"""ArviZ conversion: posterior draws, per-structure summaries, decisions, log likelihood, ELBO.

Layout of the :class:`arviz.InferenceData` built by :func:`to_inference_data` (``v`` is a noise
site's variable name, which is the Pyro site name itself, e.g. ``net.2.theta``; netCDF accepts
dots, so only a ``/`` would be replaced, by ``_``, and ``posterior.attrs["sites"]`` always maps
variable names to site names):

``posterior``
    ``v`` with dims ``(chain, draw, v_dim)``: draws of theta from the guide; chain = 1 and the
    ``v_dim`` coordinate is the structure index.
``constant_data`` (dims ``(v_dim,)``)
    ``v__loc``, ``v__scale`` (of log theta), ``v__mean`` (E[theta]), ``v__sd`` (SD[theta]),
    ``v__snr`` (E/SD), ``v__mask`` (1 kept, 0 pruned, the layer's mask when converted), and for
    every reduction labelled ``L`` (its method, unless given a dict): ``v__L__score`` (dF for BMRS,
    the criterion's score otherwise) and ``v__L__keep`` (bool). Attrs ``sites`` (JSON: per
    variable its site, bounds ``low``/``high``, ``noise``) and ``reductions`` (JSON: per label its
    method, options, fraction removed and whether the score is dF).
``log_likelihood`` / ``observed_data`` (when ``data=(X, y)`` is given)
    ``obs`` with dims ``(chain, draw, obs_dim)``: log p(y_i | x_i, theta_s) for the posterior's
    draws s (the first ``log_likelihood_draws`` of them), with the layers' masks as they are.
``training`` (when ``history`` is given)
    ``elbo`` with dim ``epoch`` (1-based), ``seconds`` per epoch and ``loss`` per step when
    recorded; attr ``events`` (JSON list, e.g. continuous-pruning events).

Everything survives ``to_netcdf`` / ``az.from_netcdf``; :func:`posteriors_from_idata`,
:func:`reductions_from_idata`, :func:`masks_from_idata` and :func:`history_from_idata` (in
:mod:`bmrs_pyro.analysis.sources`, which both this module and the plots build on) read it back.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Mapping, Optional, Sequence

with warnings.catch_warnings():
    # ArviZ 0.2x announces its coming refactor on import; users of this module cannot act on it.
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az
import numpy as np
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch
import xarray as xr

from bmrs_pyro.checks import positive_int
from bmrs_pyro.guides import is_noise_site
from bmrs_pyro.nn import noise_mode

from .sources import SEP, TRAINING_GROUP, as_reductions, is_delta_f_method, keep_mask, noise_guide, scores_of



def var_name(site: str) -> str:
    """The variable name of a site: the site itself, with ``/`` (illegal in netCDF) as ``_``."""
    return site.replace("/", "_")


def _json(value: Any) -> str:
    return json.dumps(value, default=_json_default, sort_keys=True)


def _json_default(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().cpu().tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _check_data(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"data must be a pair (X, y) of tensors, got {type(data).__name__}")
    x, y = data
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise ValueError(f"data must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"data: X has {x.shape[0]} rows and y has {y.shape[0]}; they must match and be > 0")
    return x, y


# ---------------------------------------------------------------------------------- draws


def posterior_draws(guide: Any, num_samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{site: (num_samples, S) float64}`` draws of theta from the guide, without touching the
    global random state."""
    guide = noise_guide(guide)
    num_samples = positive_int("num_samples", num_samples)
    out = {}
    device = next(iter(guide.layers.values())).mask.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for site in guide.site_names:
            out[site] = guide.posterior(site).sample((num_samples,)).detach().cpu().double()
    return out


def _other_latents(model: Any, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    trace = poutine.trace(model).get_trace(x[:1], y[:1])
    return [
        name for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not is_noise_site(site)
        and not site_is_subsample(site)
    ]


@torch.no_grad()
def pointwise_log_likelihood(
    model: Any,
    guide: Any,
    data: tuple[torch.Tensor, torch.Tensor],
    draws: Mapping[str, torch.Tensor],
    *,
    obs_site: str = "obs",
    max_rows: int = 4096,
    seed: int = 0,
) -> np.ndarray:
    """log p(y_i | x_i, theta_s) as a (draws, N) array, for the given draws of every noise site.

    The model runs in ``"sample"`` mode with each noise site conditioned on draw s for every
    example (so draw s is one network) and the layers' current masks. Other latent sites
    (Bayesian weights) are replayed from one guide trace per draw. Modules are put in eval mode
    for the call (BatchNorm running statistics, no dropout) and restored afterwards. With
    per-example noise several draws run as one batch of at most ``max_rows`` rows. ``seed``
    seeds the guide's draws of other latent sites; the global random state is left alone.
    """
    x, y = _check_data(data)
    max_rows = positive_int("max_rows", max_rows)
    ng = noise_guide(guide)
    layers = ng.layers
    device = next(iter(layers.values())).mask.device
    x, y = x.to(device), y.to(device)
    if set(draws) != set(layers):
        raise ValueError(f"draws cover sites {sorted(draws)} but the guide has {sorted(layers)}")
    num = {s.shape[0] for s in draws.values()}
    if len(num) != 1:
        raise ValueError("every site needs the same number of draws")
    num_draws = num.pop()
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if was_training is not None:
        model.eval()
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with noise_mode(model, "sample"), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            others = _other_latents(model, x, y)
            if others or any(layer.noise != "example" for layer in layers.values()):
                rows = [_loglik_one_draw(model, guide, x, y, draws, layers, d, others, obs_site, max_rows)
                        for d in range(num_draws)]
                return np.stack(rows)
            return _loglik_tiled(model, x, y, draws, layers, obs_site, max_rows)
    finally:
        if was_training:
            model.train()


def _obs_log_prob(trace, obs_site: str) -> torch.Tensor:
    if obs_site not in trace.nodes:
        raise ValueError(f"the model has no sample site {obs_site!r}; pass obs_site=<its observation site>")
    site = trace.nodes[obs_site]
    return site["fn"].log_prob(site["value"])


def _loglik_tiled(model, x, y, draws, layers, obs_site: str, max_rows: int) -> np.ndarray:
    # Per-example noise lets k draws run as one batch of k * B rows, draw-major.
    n = x.shape[0]
    num_draws = next(iter(draws.values())).shape[0]
    batch = min(n, max_rows)
    out = np.empty((num_draws, n))
    for start in range(0, n, batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        b = xb.shape[0]
        k = max(1, max_rows // b)
        for d0 in range(0, num_draws, k):
            d1 = min(num_draws, d0 + k)
            reps = d1 - d0
            values = {
                site: draws[site][d0:d1].to(layer.mask).repeat_interleave(b, 0)
                for site, layer in layers.items()
            }
            xt = xb.repeat(reps, *([1] * (xb.dim() - 1)))
            yt = yb.repeat(reps, *([1] * (yb.dim() - 1)))
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(xt, yt)
            lp = _obs_log_prob(trace, obs_site).reshape(reps, b)
            out[d0:d1, start:start + b] = lp.double().cpu().numpy()
    return out


def _loglik_one_draw(model, guide, x, y, draws, layers, d: int, others, obs_site: str, max_rows: int) -> np.ndarray:
    guide_trace = poutine.trace(guide).get_trace(x[:1], y[:1]) if others else None
    parts = []
    for start in range(0, x.shape[0], max_rows):
        xb, yb = x[start:start + max_rows], y[start:start + max_rows]
        values = {}
        for site, layer in layers.items():
            theta = draws[site][d].to(layer.mask)
            values[site] = theta.expand(xb.shape[0], -1) if layer.noise == "example" else theta
        fn = poutine.condition(model, data=values)
        if guide_trace is not None:
            fn = poutine.replay(fn, trace=guide_trace)
        trace = poutine.trace(fn).get_trace(xb, yb)
        parts.append(_obs_log_prob(trace, obs_site).double().cpu().numpy().reshape(-1))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------- groups


def _site_summaries(guide) -> tuple[dict, dict]:
    data, meta = {}, {}
    with torch.no_grad():
        for site, layer in guide.layers.items():
            q = guide.posterior(site)
            v = var_name(site)
            values = {
                "loc": q.loc, "scale": q.scale, "mean": q.mean,
                "sd": q.variance.sqrt(), "snr": q.signal_to_noise, "mask": layer.mask,
            }
            for key, value in values.items():
                data[f"{v}{SEP}{key}"] = value.detach().cpu().double().numpy()
            meta[v] = {"site": site, "low": float(layer.low), "high": float(layer.high),
                       "noise": layer.noise, "num_structures": int(layer.num_structures)}
    return data, meta


def _reduction_data(reductions: Mapping[str, Any], sites: Sequence[str]) -> tuple[dict, dict]:
    data, meta = {}, {}
    for label, result in reductions.items():
        if SEP in label or "/" in label:
            raise ValueError(f"reduction label {label!r} must not contain {SEP!r} or '/'")
        unknown = sorted(set(result.keep) - set(sites))
        if unknown:
            raise ValueError(f"reduction {label!r} has sites {unknown} that the guide does not know ({list(sites)})")
        for site in result.keep:
            v = var_name(site)
            data[f"{v}{SEP}{label}{SEP}keep"] = keep_mask(result, site).numpy()
            if site in result.scores:
                data[f"{v}{SEP}{label}{SEP}score"] = scores_of(result, site).numpy()
        fraction = getattr(result, "fraction_removed", None)
        meta[label] = {
            "method": str(result.method),
            "options": dict(getattr(result, "options", {}) or {}),
            "fraction_removed": None if fraction is None else float(fraction),
            "score": "delta_f" if is_delta_f_method(result.method) else "score",
        }
    return data, meta


def _history_dataset(history: Any) -> xr.Dataset:
    if isinstance(history, Mapping):
        elbo, loss = history.get("elbo"), history.get("loss", [])
        seconds, events = history.get("seconds", []), history.get("events", [])
        warm = history.get("warm_start", [])
    elif hasattr(history, "elbo"):
        elbo, loss = history.elbo, getattr(history, "loss", [])
        seconds, events = getattr(history, "seconds", []), getattr(history, "events", [])
        warm = getattr(history, "warm_start", [])
    else:
        elbo, loss, seconds, events, warm = history, [], [], [], []
    try:
        elbo = np.asarray(list(elbo), dtype=float)
    except (TypeError, ValueError):
        raise ValueError("history must be a bmrs_pyro.infer.History, a dict with 'elbo' or a list of floats") from None
    if elbo.ndim != 1 or elbo.size == 0:
        raise ValueError("history has no ELBO values: pass History from fit() or a non-empty list of floats")
    epochs = np.arange(1, elbo.size + 1)
    variables = {"elbo": ("epoch", elbo)}
    seconds = np.asarray(list(seconds), dtype=float)
    if seconds.size == elbo.size:
        variables["seconds"] = ("epoch", seconds)
    loss = np.asarray(list(loss), dtype=float)
    coords = {"epoch": epochs}
    if loss.size:
        variables["loss"] = ("step", loss)
        coords["step"] = np.arange(loss.size)
    return xr.Dataset(variables, coords=coords,
                      attrs={"events": _json(list(events)), "warm_start": _json([float(v) for v in warm or []])})


def to_inference_data(
    model: Any,
    guide: Any,
    *,
    num_samples: int = 1000,
    data: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    reduction: Any = None,
    history: Any = None,
    seed: int = 0,
    log_likelihood_draws: Optional[int] = None,
    obs_site: str = "obs",
    max_rows: int = 4096,
) -> az.InferenceData:
    """Convert a fitted multiplicative-noise model and its guide to :class:`arviz.InferenceData`.

    Args:
        model, guide: the Pyro model (noise layers with their masks) and a guide that has run.
        num_samples: posterior draws of theta per site (one chain).
        data: held-out ``(X, y)``; adds ``log_likelihood`` (pointwise, for ``az.loo``/``az.waic``)
            and ``observed_data``.
        reduction: a result of :func:`bmrs_pyro.reduce`, a list of them or ``{label: result}``;
            their scores and keep masks go to ``constant_data``.
        history: :class:`bmrs_pyro.infer.History`, a dict with ``"elbo"`` or a list of ELBOs.
        seed: seeds the draws (the global random state is left as it was).
        log_likelihood_draws: how many of the draws enter the log likelihood (default all).
        obs_site: the model's observation site.
        max_rows: rows per forward pass of the log likelihood (draws x examples); lower it for
            large inputs.

    The layout is in this module's docstring.
    """
    num_samples = positive_int("num_samples", num_samples)
    ng = noise_guide(guide)
    reductions = as_reductions(reduction)
    draws = posterior_draws(ng, num_samples, seed)
    sites = list(draws)
    names = [var_name(s) for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names {sites} collide once '/' is replaced; rename the layers")

    posterior = {var_name(s): d.numpy()[None] for s, d in draws.items()}
    dims = {var_name(s): [f"{var_name(s)}_dim"] for s in sites}
    coords = {f"{var_name(s)}_dim": np.arange(d.shape[1]) for s, d in draws.items()}

    constant, site_meta = _site_summaries(ng)
    red_data, red_meta = _reduction_data(reductions, sites)
    constant.update(red_data)
    for name in constant:
        owner = max((v for v in names if name.startswith(f"{v}{SEP}")), key=len)
        dims[name] = [f"{owner}_dim"]

    kwargs: dict[str, Any] = {}
    if data is not None:
        x, y = _check_data(data)
        k = num_samples if log_likelihood_draws is None else positive_int("log_likelihood_draws", log_likelihood_draws)
        if k > num_samples:
            raise ValueError(f"log_likelihood_draws ({k}) cannot exceed num_samples ({num_samples})")
        subset = {s: d[:k] for s, d in draws.items()}
        loglik = pointwise_log_likelihood(model, guide, (x, y), subset, obs_site=obs_site, max_rows=max_rows,
                                          seed=seed + 1)
        kwargs["log_likelihood"] = {obs_site: loglik[None]}
        kwargs["observed_data"] = {obs_site: y.detach().cpu().numpy()}
        dims[obs_site] = ["obs_dim"]
        coords["obs_dim"] = np.arange(x.shape[0])

    idata = az.from_dict(
        posterior=posterior, constant_data=constant, dims=dims, coords=coords,
        **kwargs,
    )
    idata.posterior.attrs.update({"sites": _json({v: m["site"] for v, m in site_meta.items()}),
                                  "seed": int(seed), "num_samples": num_samples})
    idata.constant_data.attrs["sites"] = _json(site_meta)
    # JSON attributes are written with sorted keys (net.11 before net.2); keep the network order.
    idata.constant_data.attrs["site_order"] = _json(list(site_meta))
    idata.constant_data.attrs["reductions"] = _json(red_meta)
    if history is not None:
        idata.add_groups({TRAINING_GROUP: _history_dataset(history)})
    return idata


# ---------------------------------------------------------------------------------- comparison


def _log_lik_idata(model, guide, data, draws, obs_site: str, seed: int) -> az.InferenceData:
    loglik = pointwise_log_likelihood(model, guide, data, draws, obs_site=obs_site, seed=seed)
    posterior = {var_name(s): d.numpy()[None] for s, d in draws.items()}
    return az.from_dict(
        posterior=posterior, log_likelihood={obs_site: loglik[None]},
        dims={obs_site: ["obs_dim"], **{var_name(s): [f"{var_name(s)}_dim"] for s in draws}},
    )


def compare_pruned(
    model: Any,
    guide: Any,
    data: tuple[torch.Tensor, torch.Tensor],
    reduction: Any,
    *,
    num_samples: int = 500,
    seed: int = 0,
    ic: str = "loo",
    obs_site: str = "obs",
):
    """``az.compare`` of the unpruned network (all masks 1) with the pruned one(s) on ``data``.

    Both use the same posterior draws of theta, so the difference is the decisions alone. With
    one reduction the models are named ``"unpruned"`` and ``"pruned"``; with several, the pruned
    ones are named by their labels. The layers' masks are restored afterwards. Returns the
    ``pandas.DataFrame`` of :func:`arviz.compare` (best model first, ``elpd_diff`` against it).
    """
    reductions = as_reductions(reduction)
    if not reductions:
        raise ValueError("compare_pruned needs a reduction (a bmrs_pyro.reduce(...) result)")
    if ic not in ("loo", "waic"):
        raise ValueError(f"ic must be 'loo' or 'waic', got {ic!r}")
    data = _check_data(data)
    ng = noise_guide(guide)
    layers = ng.layers
    draws = posterior_draws(ng, num_samples, seed)
    saved = {site: layer.mask.detach().clone() for site, layer in layers.items()}
    models: dict[str, az.InferenceData] = {}
    try:
        with torch.no_grad():
            for layer in layers.values():
                layer.mask.fill_(1.0)
            models["unpruned"] = _log_lik_idata(model, guide, data, draws, obs_site, seed + 1)
            for label, result in reductions.items():
                for site, layer in layers.items():
                    layer.mask.copy_(keep_mask(result, site).to(layer.mask) if site in result.keep else torch.ones_like(layer.mask))
                name = "pruned" if len(reductions) == 1 else label
                if name == "unpruned":
                    raise ValueError("a reduction may not be labelled 'unpruned'")
                models[name] = _log_lik_idata(model, guide, data, draws, obs_site, seed + 1)
    finally:
        with torch.no_grad():
            for site, layer in layers.items():
                layer.mask.copy_(saved[site])
    return az.compare(models, ic=ic)
