"""Apply a pruning criterion to every noise layer of a model: :func:`reduce`.

Threshold-free methods (``bmrs_n``, ``bmrs_u``: prune where dF >= -margin, 1 nat by default;
``snr``: prune where SNR < 1) decide by their own rule; ranking
criteria (``e_theta``, ``l2``, ``activation``) remove a requested ``fraction`` of the lowest-ranked
structures. A rule-based method given a ``fraction`` ranks by its score instead (BMRS by -dF), so
that every method can be swept into an accuracy-vs-compression curve. See
:mod:`bmrs_pyro.criteria` for the criteria and how to add one.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch.distributions import kl_divergence
from torch.utils.data import DataLoader

from .checks import check_data
from .criteria import CRITERIA, SCOPES, Criterion, get_criterion
from .structures import _quiet_eval
from .distributions import LogUniform
from .evaluation import _evaluate
from .guides import find_noise_guide
from .nn import MultiplicativeNoise, noise_modules
from .reduction_result import ReductionResult


# fraction * S is floored; the tolerance keeps 0.3 * 10 (= 2.9999...) at 3.
_FLOOR_TOL = 1e-9


def _noise_guide(guide):
    """The part of ``guide`` that holds the noise posteriors (itself, or inside an AutoGuideList)."""
    found = find_noise_guide(guide)
    if found is None:
        raise ValueError(
            "reduce needs an AutoTruncatedLogNormal guide (or an AutoGuideList holding one), "
            f"got {type(guide).__name__}"
        )
    return found


def _sites(model, guide) -> dict[str, MultiplicativeNoise]:
    layers = noise_modules(model)
    if not layers:
        raise ValueError("the model has no MultiplicativeNoise layer: nothing to prune")
    covered = set(guide.site_names)
    if not covered:
        raise ValueError("the guide has not run yet: fit the model (or run one SVI step) before reduce")
    sites = {s: layer for s, layer in layers.items() if s in covered}
    if not sites:
        raise ValueError(
            f"the guide covers none of the model's noise sites {list(layers)}; was it built for this model?"
        )
    return sites


def _check_fraction(fraction) -> Optional[float]:
    if fraction is None:
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1] (the share of structures to remove), got {fraction!r}")
    return float(fraction)


def _rank_remove(importance: torch.Tensor, alive: torch.Tensor, n_remove: int, groups: torch.Tensor,
                 room: dict) -> torch.Tensor:
    """Remove up to ``n_remove`` alive structures, least important first, within each group's room."""
    removed = torch.zeros_like(alive)
    if n_remove <= 0:
        return removed
    candidates = torch.nonzero(alive).flatten()
    order = candidates[torch.sort(importance[candidates], stable=True).indices]
    count = 0
    for idx in order.tolist():
        if count >= n_remove:
            break
        g = int(groups[idx])
        if room[g] > 0:
            removed[idx] = True
            room[g] -= 1
            count += 1
    return removed


def reduce(
    model: torch.nn.Module,
    guide,
    method: str | Criterion = "bmrs_n",
    *,
    fraction: Optional[float] = None,
    scope: Optional[str] = None,
    data=None,
    respect_mask: bool = True,
    min_keep: Optional[int] = None,
    **options,
) -> ReductionResult:
    """Score every structure of every noise layer with ``method`` and decide which to keep.

    Args:
        model, guide: a fitted multiplicative-noise model and its
            :class:`~bmrs_pyro.guides.AutoTruncatedLogNormal` guide (or an AutoGuideList holding one).
        method: a name in :data:`~bmrs_pyro.criteria.CRITERIA` (``bmrs_n``, ``bmrs_u``, ``snr``,
            ``e_theta``, ``l2``, ``activation``, ...) or a :class:`~bmrs_pyro.criteria.Criterion`.
        fraction: remove this share of structures (in [0, 1]), lowest-ranked first. Required for
            ranking-only criteria; for rule-based ones (BMRS, SNR) it replaces the rule by ranking
            on the score (BMRS ranks by -dF). The count is ``floor(fraction * S)`` over all
            structures (global scope) or per layer (layer scope); with ``respect_mask`` already
            pruned structures count towards it first.
        scope: ``"global"`` ranks all structures of all layers together (the default for the
            scale-free scores dF, SNR and E[theta]); ``"layer"`` ranks within each layer (the
            default for L2 and activation, whose scale differs from layer to layer).
        data: ``(X, y)``, ``X`` or a DataLoader for data-dependent criteria (``activation``);
            use training data.
        respect_mask: structures already masked stay pruned (the default; continuous pruning
            relies on it). With False the masks are ignored and decided afresh.
        min_keep: keep at least this many structures per layer. Defaults to 1 with ``fraction``
            and to 0 (the rule decides, even to remove a whole layer) without it. Structures
            already masked (with ``respect_mask``) are never brought back to satisfy it.
        **options: the criterion's own options: ``margin`` (nats, default 1; the BMRS rules prune
            where dF >= -margin, ``margin=0`` is the strict rule dF >= 0) for ``bmrs_n`` and
            ``bmrs_u``; ``reference_code=True`` for ``bmrs_n`` (the authors' public-code decisions,
            i.e. margin 0.5 log 2pi = 0.919); ``bits``/``reduced_low`` for ``bmrs_u``,
            ``reduced_loc``/``reduced_scale`` for ``bmrs_n``, ``batch_size`` for ``activation``.
            The scores are always the exact dF; the margin only moves the decision.

    Returns:
        A :class:`ReductionResult`; call ``.apply()`` to write the masks into the model.

    Raises:
        ValueError: unknown method or option, bad fraction/scope/min_keep, a ranking criterion
        without ``fraction``, a criterion needing data without ``data``, an unfitted guide.
    """
    criterion = get_criterion(method)
    crit_options = criterion.check_options(options)
    fraction = _check_fraction(fraction)
    if fraction is not None and not criterion.rankable:
        raise ValueError(f"{criterion.name!r} removes nothing and cannot rank structures; drop fraction=")
    if fraction is None and not criterion.has_rule:
        raise ValueError(
            f"{criterion.name!r} ranks structures but has no threshold of its own: pass fraction=<share to "
            f"remove>, or use a threshold-free method (bmrs_n, bmrs_u, snr)"
        )
    scope = criterion.default_scope if scope is None else scope
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if min_keep is None:
        min_keep = 1 if fraction is not None else 0
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"min_keep must be an int >= 0, got {min_keep!r}")
    if criterion.needs_data and data is None:
        raise ValueError(f"{criterion.name!r} needs data: pass data=(X, y) (training data)")
    if data is not None:
        check_data(data, model, name="data")  # one-line errors before any structure is scored
    noise_guide = _noise_guide(guide)
    sites = _sites(model, noise_guide)

    scores = {}
    for site, layer in sites.items():
        s = criterion.score(model, noise_guide, site, layer, data=data, **criterion.score_options(crit_options))
        s = torch.as_tensor(s).detach().flatten().cpu()
        if s.shape != (layer.num_structures,):
            raise ValueError(
                f"criterion {criterion.name!r} returned shape {tuple(s.shape)} for {site}; expected ({layer.num_structures},)"
            )
        if torch.isnan(s).any():
            raise ValueError(f"criterion {criterion.name!r} gave NaN scores at {site} (check the fitted guide)")
        scores[site] = s

    alive = {site: (layer.mask.detach().cpu() > 0) if respect_mask else torch.ones(layer.num_structures, dtype=torch.bool)
             for site, layer in sites.items()}
    if fraction is None:
        keep = {site: criterion.decide(scores[site], crit_options) & alive[site] for site in sites}
        if min_keep > 0:
            keep = {site: _top_up(keep[site], alive[site], criterion.importance(scores[site]), min_keep)
                    for site in sites}
    else:
        importance = {site: criterion.importance(score) for site, score in scores.items()}
        keep = keep_fraction(importance, fraction, alive=alive, scope=scope, min_keep=min_keep)

    kept_per_layer = {site: (int(keep[site].sum()), sites[site].num_structures) for site in sites}
    total = sum(t for _, t in kept_per_layer.values())
    removed = sum(t - k for k, t in kept_per_layer.values())
    recorded = dict(crit_options, fraction=fraction, scope=scope if fraction is not None else None,
                    respect_mask=respect_mask, min_keep=min_keep)
    if fraction is None:
        rule = criterion.rule_text(crit_options)
    else:
        rule = (f"remove the {100 * fraction:g} % lowest-ranked structures by {criterion.label} "
                f"({scope} scope)")
    return ReductionResult(
        method=criterion.name,
        options=recorded,
        scores=scores,
        keep=keep,
        kept_per_layer=kept_per_layer,
        fraction_removed=removed / total,
        label=criterion.label,
        layers=dict(sites),
        rule=rule,
    )


def _top_up(keep: torch.Tensor, alive: torch.Tensor, importance: torch.Tensor, min_keep: int) -> torch.Tensor:
    missing = min_keep - int(keep.sum())
    if missing <= 0:
        return keep
    candidates = torch.nonzero(alive & ~keep).flatten()
    order = candidates[torch.sort(importance[candidates], descending=True, stable=True).indices]
    keep = keep.clone()
    keep[order[:missing]] = True
    return keep


def keep_fraction(importance: Mapping[str, torch.Tensor], fraction: float, *,
                  alive: Optional[Mapping[str, torch.Tensor]] = None, scope: str = "global",
                  min_keep: int = 1) -> dict[str, torch.Tensor]:
    """The one ranked removal: keep masks after removing ``floor(fraction * S)`` structures, least
    important first.

    Args:
        importance: per site, one score per structure (higher = more important); with
            ``scope="global"`` they must be comparable across sites.
        fraction: the share in [0, 1] of each bucket's structures that ends removed, counting
            those already dead in ``alive`` (default: all alive).
        scope: ``"global"`` ranks all sites together, ``"layer"`` each site on its own.
        min_keep: every site keeps at least this many of its alive structures (so the count may
            fall short at high fractions).

    Ties are broken by position (stable sort: the lower index goes first). Returns
    ``{site: bool keep mask}``.
    """
    fraction = _check_fraction(fraction)
    if fraction is None:
        raise ValueError("fraction must be a number in [0, 1], got None")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    sites = list(importance)
    if alive is None:
        alive = {s: torch.ones(importance[s].numel(), dtype=torch.bool) for s in sites}
    buckets = [sites] if scope == "global" else [[site] for site in sites]
    keep = {}
    for bucket in buckets:
        imp = torch.cat([importance[s].detach().to(torch.float64).flatten() for s in bucket])
        live = torch.cat([alive[s].bool().flatten() for s in bucket])
        groups = torch.cat([torch.full((importance[s].numel(),), i) for i, s in enumerate(bucket)])
        target = math.floor(fraction * live.numel() + _FLOOR_TOL)
        already = int((~live).sum())
        room = {i: max(int(alive[s].sum()) - min_keep, 0) for i, s in enumerate(bucket)}
        kept = live & ~_rank_remove(imp, live, target - already, groups, room)
        start = 0
        for s in bucket:
            n = importance[s].numel()
            keep[s] = kept[start : start + n]
            start += n
    return keep


def _train_log_likelihood(model, guide, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Sum over (x, y) of log p(y | x) in deterministic mode (E_q[theta] * mask); leaves the random
    state, the modules' train/eval modes and BatchNorm statistics as they were."""

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with _quiet_eval(model):
        nll = _evaluate(model, guide, (x, y), "mean", 1, batch_size, "obs", device)["nll"]
    return -nll * x.shape[0]


def _some_examples(data, limit: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Up to ``limit`` examples of ``(X, y)`` or a DataLoader, and the size of the whole set."""

    if isinstance(data, DataLoader):
        xs, ys, count = [], [], 0
        for xb, yb in data:
            xs.append(xb)
            ys.append(yb)
            count += xb.shape[0]
            if count >= limit:
                break
        return torch.cat(xs)[:limit], torch.cat(ys)[:limit], len(data.dataset)
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0])):
        raise ValueError("check_jointly needs data=(X, y) tensors or a DataLoader (the training data)")
    return data[0], data[1], data[0].shape[0]


def check_jointly(
    result: ReductionResult,
    model: torch.nn.Module,
    guide,
    data,
    *,
    max_examples: int = 8192,
    seed: int = 0,
) -> ReductionResult:
    """Hold a BMRS decision to its margin jointly: remove fewer structures if the set is too costly.

    BMR scores every structure alone (the posterior is mean-field), so it cannot see structures
    that are each a near-tie but together carry the fit: a network whose posteriors all stayed
    close to the prior (e.g. trained from posteriors initialised at the prior) has every dF in
    (-margin, 0), and removing all of them at once would empty it. This check computes the change
    in the ELBO that removing the set would really make, on the training data, as the change of
    the log likelihood in deterministic mode plus the KL(q || p) terms that disappear (a removed
    structure's posterior becomes its reduced prior), and keeps the removal only while it costs at
    most ``margin`` nats per structure removed, the rule's own promise. When the whole set costs
    more, the largest prefix (most prunable, i.e. largest dF, first) that keeps the promise is
    removed. Before that, a layer none of whose structures has evidence beyond the margin
    (every dF >= -margin) is left as it is: its posteriors have not been informed by the data yet
    (they all sit at the prior), and BMR cannot tell "not needed" from "not learnt". Results
    without a margin (no BMRS rule) are returned unchanged.

    Args:
        result: a :func:`reduce` result of ``bmrs_n``/``bmrs_u`` (its ``keep`` against the layers'
            current masks tells what it would newly remove).
        data: ``(X, y)`` training tensors; at most ``max_examples`` of them (a fixed random subset)
            are used and the log likelihood is scaled to the full set.

    Returns:
        ``result`` itself when the whole set keeps the margin, else a new result with fewer
        structures removed; either way ``result.options["joint_check"]`` records the check.
    """
    margin = result.margin
    if margin is None:
        return result
    x, y, n = _some_examples(data, max_examples)
    if n > max_examples:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_examples]
        x, y = x[idx], y[idx]
    factor = n / x.shape[0]
    noise_guide = _noise_guide(guide)
    layers = result.layers
    alive = {s: layers[s].mask.detach().cpu() > 0 for s in result.keep}
    uninformed = [s for s in result.keep if not bool((result.scores[s] < -margin).any())]
    new = [(float(result.scores[s][i]), s, i) for s in result.keep if s not in uninformed
           for i in torch.nonzero(alive[s] & ~result.keep[s]).flatten().tolist()]
    proposed = sum(int((alive[s] & ~result.keep[s]).sum()) for s in result.keep)
    if not new and not proposed:
        return result
    new.sort(key=lambda t: -t[0])  # most prunable first
    kl = {}
    for s in result.keep:
        q = noise_guide.posterior(s)
        prior = LogUniform(q.loc.new_tensor(layers[s].low), q.loc.new_tensor(layers[s].high)).expand(q.batch_shape)
        kl[s] = kl_divergence(q, prior).detach().double().cpu().reshape(-1)
    saved = {s: layers[s].mask.detach().clone() for s in result.keep}

    def gain(k: int) -> float:
        """ELBO change (nats) of removing the first k new structures."""
        try:
            with torch.no_grad():
                for s, i in ((s, i) for _, s, i in new[:k]):
                    layers[s].mask[i] = 0.0
            ll = _train_log_likelihood(model, guide, x, y)
        finally:
            with torch.no_grad():
                for s in saved:
                    layers[s].mask.copy_(saved[s])
        return (ll - base) * factor + sum(float(kl[s][i]) for _, s, i in new[:k])

    total = len(new)
    base = _train_log_likelihood(model, guide, x, y) if new else 0.0
    ok = lambda k: gain(k) >= -margin * k  # noqa: E731
    if not new or ok(total):
        accepted = total
    else:
        lo, hi = 0, total  # ok(lo) holds (k = 0 costs nothing); ok(hi) fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        accepted = lo
    record = {"proposed": proposed, "removed": accepted, "uninformed_layers": uninformed,
              "max_examples": max_examples}
    if accepted == proposed:
        result.options["joint_check"] = record
        return result
    keep = {s: (alive[s].clone() if s in uninformed else k.clone()) for s, k in result.keep.items()}
    for _, s, i in new[accepted:]:
        keep[s][i] = True
    kept_per_layer = {s: (int(keep[s].sum()), layers[s].num_structures) for s in keep}
    all_total = sum(t for _, t in kept_per_layer.values())
    removed = sum(t - k for k, t in kept_per_layer.values())
    return ReductionResult(
        method=result.method, options=dict(result.options, joint_check=record), scores=result.scores, keep=keep,
        kept_per_layer=kept_per_layer, fraction_removed=removed / all_total, label=result.label, layers=layers,
        rule=result.rule + f"; held to the margin jointly on the training data: {accepted} of {proposed} removed",
    )


def guarded_reduce(model: torch.nn.Module, guide, method: str | Criterion, train_data, *,
                   joint_check: bool = True, **options) -> ReductionResult:
    """:func:`reduce` as training and ``bmrs run`` apply it: at least one structure per layer
    (``min_keep=1`` unless given) and, for BMRS rules, :func:`check_jointly` on ``train_data``
    (skipped with ``joint_check=False``). ``train_data`` also feeds criteria that need data."""
    options.setdefault("min_keep", 1)
    if get_criterion(method).needs_data:
        options.setdefault("data", train_data)
    result = reduce(model, guide, method, **options)
    return check_jointly(result, model, guide, train_data) if joint_check else result


def prune_event(result: ReductionResult, epoch: int, **extra) -> dict:
    """The ``History.events`` entry of a reduction applied after ``epoch`` (0-based)."""
    event = {"epoch": epoch, "event": "prune", "method": result.method,
             "kept": {k: int(v.sum()) for k, v in result.keep.items()},
             "fraction_removed": result.fraction_removed, **extra}
    if "joint_check" in result.options:
        event["joint_check"] = dict(result.options["joint_check"])
    return event


__all__ = ["CRITERIA", "ReductionResult", "check_jointly", "guarded_reduce", "keep_fraction", "prune_event", "reduce"]
