"""Adapters: turn the things users hold (reductions, guides, inference data) into plain tables.

The analysis functions accept several kinds of input wherever it is natural:

- a *reduction*: one result of :func:`bmrs_pyro.reduce` (anything with ``method``, ``scores`` and
  ``keep``), a list of them (several methods), a dict ``{label: result}``, or a
  :class:`SavedReduction` read back from inference data;
- a *posterior source*: a guide (anything with ``site_names`` and ``posterior(site)``), a
  ``(model, guide)`` pair, an :class:`arviz.InferenceData` written by
  :func:`bmrs_pyro.analysis.to_inference_data`, or a dict ``{site: TruncatedLogNormal}``.

Only the fields named above are relied on, so the analysis works with any object that has them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

with warnings.catch_warnings():
    # ArviZ 0.2x announces its coming refactor on import; users of this module cannot act on it.
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az
import numpy as np
import torch
import xarray as xr

from bmrs_pyro.distributions import TruncatedLogNormal
from bmrs_pyro.guides import find_noise_guide

#: Methods whose ``scores`` are the change in log evidence dF (prune where dF >= -margin).
DELTA_F_PREFIX = "bmrs"

#: Separator in constant_data variable names (``<site>__<field>``) and the ELBO history group.
SEP = "__"
TRAINING_GROUP = "training"
_SUMMARIES = ("loc", "scale", "mean", "sd", "snr", "mask")


def is_delta_f_method(method: str) -> bool:
    """True when a method's scores are dF (BMRS_N, BMRS_U and their variants, and ``none``, which
    removes nothing but keeps BMRS_N's dF to look at)."""
    method = str(method).lower()
    return method.startswith(DELTA_F_PREFIX) or method == "none"


@dataclass
class SavedReduction:
    """A reduction without a model: per-site scores and keep masks, e.g. read back from disk.

    It has the fields of :class:`bmrs_pyro.pruner.ReductionResult` that the analysis uses.
    """

    method: str
    scores: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor]
    options: dict = field(default_factory=dict)

    @property
    def kept_per_layer(self) -> dict[str, tuple[int, int]]:
        """``{site: (kept, total)}``."""
        return {s: (int(k.sum()), int(k.numel())) for s, k in self.keep.items()}

    @property
    def fraction_removed(self) -> float:
        """Fraction of all structures removed, in [0, 1]."""
        total = sum(int(k.numel()) for k in self.keep.values())
        kept = sum(int(k.sum()) for k in self.keep.values())
        return 1.0 - kept / total if total else 0.0


def _check_reduction(obj: Any, where: str) -> None:
    missing = [f for f in ("method", "keep", "scores") if not hasattr(obj, f)]
    if missing:
        raise ValueError(
            f"{where}: expected a reduction result (bmrs_pyro.reduce(...)) with fields method, "
            f"scores and keep; {type(obj).__name__} lacks {missing}"
        )
    if not isinstance(obj.keep, Mapping) or not obj.keep:
        raise ValueError(f"{where}: the reduction's keep must be a non-empty dict {{site: bool tensor}}")


def as_reductions(reduction: Any, where: str = "reduction") -> dict[str, Any]:
    """Normalise one reduction, a list of them or a ``{label: result}`` dict to ``{label: result}``.

    Labels default to each result's ``method``; two results with the same method need a dict
    with distinct labels (e.g. ``{"bmrs_u-8": r8, "bmrs_u-4": r4}``).
    """
    if reduction is None:
        return {}
    if isinstance(reduction, Mapping) and not hasattr(reduction, "keep"):
        items = list(reduction.items())
    elif isinstance(reduction, (list, tuple)):
        items = [(getattr(r, "method", None), r) for r in reduction]
    else:
        items = [(getattr(reduction, "method", None), reduction)]
    out: dict[str, Any] = {}
    for label, result in items:
        _check_reduction(result, where)
        label = str(label)
        if label in out:
            raise ValueError(
                f"{where}: two reductions are labelled {label!r}; pass a dict "
                "{label: result} with distinct labels"
            )
        out[label] = result
    return out


def keep_mask(result: Any, site: str) -> torch.Tensor:
    """The keep mask of ``site`` as a bool CPU tensor."""
    return torch.as_tensor(result.keep[site]).detach().cpu().bool().flatten()


def scores_of(result: Any, site: str) -> torch.Tensor:
    """The scores of ``site`` as a float64 CPU tensor."""
    return torch.as_tensor(result.scores[site]).detach().cpu().double().flatten()


def kept_total(source: Any) -> dict[str, tuple[int, int]]:
    """``{site: (kept, total)}`` from a reduction or from such a dict itself."""
    if isinstance(source, Mapping) and not hasattr(source, "keep"):
        out = {}
        for site, value in source.items():
            try:
                kept, total = (int(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"kept width for {site!r} must be a pair (kept, total), got {value!r}"
                ) from None
            if not 0 <= kept <= total or total < 1:
                raise ValueError(f"kept width for {site!r}: need 0 <= kept <= total and total >= 1, got {value!r}")
            out[str(site)] = (kept, total)
        if not out:
            raise ValueError("no layers given: pass {site: (kept, total)} or a reduction result")
        return out
    _check_reduction(source, "kept width")
    return {s: (int(keep_mask(source, s).sum()), keep_mask(source, s).numel()) for s in source.keep}


def noise_guide(guide: Any) -> Any:
    """The guide that owns the noise sites, or a ValueError saying what is wrong."""
    found = find_noise_guide(guide)
    if found is None:
        raise ValueError(
            f"expected an AutoTruncatedLogNormal guide (or an AutoGuideList holding one), got {type(guide).__name__}"
        )
    if getattr(found, "prototype_trace", True) is None or not found.site_names:
        raise ValueError("the guide has not run yet: fit the model (or call guide(x, y) once) first")
    return found


def posteriors(source: Any) -> dict[str, TruncatedLogNormal]:
    """``{site: TruncatedLogNormal}`` (detached, CPU) from any posterior source (module docstring)."""
    if isinstance(source, az.InferenceData):
        return posteriors_from_idata(source)
    if isinstance(source, tuple) and len(source) == 2:
        source = source[1]
    if isinstance(source, Mapping):
        out = {}
        for site, q in source.items():
            if not isinstance(q, TruncatedLogNormal):
                raise ValueError(f"posterior of {site!r} must be a TruncatedLogNormal, got {type(q).__name__}")
            out[str(site)] = q
        return out
    guide = noise_guide(source)
    out = {}
    with torch.no_grad():
        for site in guide.site_names:
            q = guide.posterior(site)
            out[site] = TruncatedLogNormal(
                q.loc.detach().cpu().double(), q.scale.detach().cpu().double(),
                q.low.detach().cpu().double(), q.high.detach().cpu().double(),
            )
    return out


def masks(source: Any) -> dict[str, torch.Tensor]:
    """Current masks ``{site: bool tensor}`` of a (model, guide) pair, a guide or inference data."""
    if isinstance(source, az.InferenceData):
        return masks_from_idata(source)
    guide = noise_guide(source[1] if isinstance(source, tuple) else source)
    return {site: layer.mask.detach().cpu().bool() for site, layer in guide.layers.items()}


# ---------------------------------------------------------------------------------- reading inference data back


def _require(idata: Any, group: str) -> xr.Dataset:
    if not isinstance(idata, az.InferenceData):
        raise ValueError(f"expected arviz.InferenceData, got {type(idata).__name__}")
    if group not in idata.groups():
        raise ValueError(
            f"the inference data has no {group!r} group (groups: {idata.groups()}); "
            "build it with bmrs_pyro.analysis.to_inference_data"
        )
    return idata[group]


def site_table(idata: az.InferenceData) -> dict[str, dict]:
    """``{variable name: {"site", "low", "high", "noise", "num_structures"}}`` in site order."""
    cd = _require(idata, "constant_data")
    if "sites" not in cd.attrs:
        raise ValueError("constant_data lacks the 'sites' attribute: build it with to_inference_data")
    table = json.loads(cd.attrs["sites"])
    order = json.loads(cd.attrs["site_order"]) if "site_order" in cd.attrs else []
    if sorted(order) != sorted(table):  # written before site_order existed: keep what is there
        return table
    return {v: table[v] for v in order}


def posteriors_from_idata(idata: az.InferenceData) -> dict[str, TruncatedLogNormal]:
    """``{site: TruncatedLogNormal}`` rebuilt from the stored loc, scale and bounds."""
    cd = _require(idata, "constant_data")
    out = {}
    for v, meta in site_table(idata).items():
        loc = torch.as_tensor(cd[f"{v}{SEP}loc"].values, dtype=torch.float64)
        scale = torch.as_tensor(cd[f"{v}{SEP}scale"].values, dtype=torch.float64)
        out[meta["site"]] = TruncatedLogNormal(loc, scale, meta["low"], meta["high"])
    return out


def masks_from_idata(idata: az.InferenceData) -> dict[str, torch.Tensor]:
    """``{site: bool tensor}``: the layers' masks when the data were written."""
    cd = _require(idata, "constant_data")
    return {meta["site"]: torch.as_tensor(cd[f"{v}{SEP}mask"].values > 0.5)
            for v, meta in site_table(idata).items()}


def summaries_from_idata(idata: az.InferenceData) -> dict[str, dict[str, np.ndarray]]:
    """``{site: {"loc", "scale", "mean", "sd", "snr", "mask": array}}``."""
    cd = _require(idata, "constant_data")
    return {meta["site"]: {k: cd[f"{v}{SEP}{k}"].values for k in _SUMMARIES}
            for v, meta in site_table(idata).items()}


def reductions_from_idata(idata: az.InferenceData) -> dict[str, SavedReduction]:
    """``{label: SavedReduction}`` for every reduction stored in ``constant_data``."""
    cd = _require(idata, "constant_data")
    meta = json.loads(cd.attrs.get("reductions", "{}"))
    sites = site_table(idata)
    out = {}
    for label, info in meta.items():
        keep, scores = {}, {}
        for v, site_meta in sites.items():
            k = f"{v}{SEP}{label}{SEP}keep"
            if k in cd:
                keep[site_meta["site"]] = torch.as_tensor(cd[k].values.astype(bool))
            s = f"{v}{SEP}{label}{SEP}score"
            if s in cd:
                scores[site_meta["site"]] = torch.as_tensor(cd[s].values, dtype=torch.float64)
        out[label] = SavedReduction(method=info["method"], scores=scores, keep=keep, options=info.get("options", {}))
    return out


def history_from_idata(idata: az.InferenceData) -> Optional[dict]:
    """``{"elbo", "seconds", "loss", "events", "warm_start"}`` from the ``training`` group, or None
    if absent (``warm_start``: the log likelihood per deterministic warm-start epoch)."""
    if TRAINING_GROUP not in idata.groups():
        return None
    ds = idata[TRAINING_GROUP]
    return {
        "elbo": ds["elbo"].values.tolist(),
        "seconds": ds["seconds"].values.tolist() if "seconds" in ds else [],
        "loss": ds["loss"].values.tolist() if "loss" in ds else [],
        "events": json.loads(ds.attrs.get("events", "[]")),
        "warm_start": json.loads(ds.attrs.get("warm_start", "[]")),
    }
