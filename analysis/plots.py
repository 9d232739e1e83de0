"""Figures of a pruning run. Every function returns a :class:`matplotlib.figure.Figure`.

Figures are built with ``Figure()`` directly, never through ``pyplot``: nothing is shown, no
global figure list grows, and any backend works (save with ``fig.savefig`` or
:func:`bmrs_pyro.analysis.report.save_figures`). Colours come from :mod:`.palette`
(Okabe-Ito): kept structures blue, pruned vermillion.

Inputs follow :mod:`.sources`: a *reduction* is a :func:`bmrs_pyro.reduce` result, a list of
them or ``{label: result}``; a *posterior source* is a guide, ``(model, guide)``, inference data
from :func:`~bmrs_pyro.analysis.to_inference_data` or ``{site: TruncatedLogNormal}``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator, NullFormatter

from bmrs_pyro.criteria import resolve_margin
from bmrs_pyro.distributions import TruncatedNormal
from bmrs_pyro.reduction import bits_to_log_bound, delta_f_log_normal, delta_f_log_uniform

from .palette import KEPT, NEUTRAL, OKABE_ITO, PRUNED, method_colour
from .sources import SavedReduction, as_reductions, is_delta_f_method, keep_mask, masks, posteriors, scores_of


__all__ = [
    "plot_posterior_forest",
    "plot_delta_f",
    "plot_reduction_densities",
    "plot_e_theta_histograms",
    "short_site",
]

_ROW_HEIGHT = 2.6
_WIDTH = 9.0
# Legends go right of the axes: inside, wherever they sit, some data set puts points under them.
_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "frameon": False}


def short_site(site: str) -> str:
    """A site's display name: ``net.2.theta`` -> ``net.2``."""
    return site[: -len(".theta")] if site.endswith(".theta") else site


def _figure(rows: int, cols: int = 1, *, width: float = _WIDTH, row_height: float = _ROW_HEIGHT, **kw):
    fig = Figure(figsize=(width, max(2.8, row_height * rows + 0.6)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _sites(reductions: Mapping[str, Any], extra: Sequence[str] = ()) -> list[str]:
    order: list[str] = list(extra)
    for result in reductions.values():
        order += [s for s in result.keep if s not in order]
    return order


def _keep_or_all(result: Any, site: str, size: int) -> torch.Tensor:
    if result is None or site not in result.keep:
        return torch.ones(size, dtype=torch.bool)
    keep = keep_mask(result, site)
    if keep.numel() != size:
        raise ValueError(f"{site}: the reduction keeps {keep.numel()} structures but the posterior has {size}")
    return keep


# ---------------------------------------------------------------------------- forest


def plot_posterior_forest(
    source: Any,
    reduction: Any = None,
    *,
    sites: Optional[Sequence[str]] = None,
) -> Figure:
    """Each structure's posterior of log theta: median, 50 % and 94 % intervals, by decision.

    One row per layer, one column per reduction (the decisions of that method; with no
    reduction, the layers' current masks). Structures are sorted by posterior median. The
    intervals are the exact quantiles of the truncated normal of log theta.
    """
    qs = posteriors(source)
    reductions = as_reductions(reduction, "plot_posterior_forest")
    if not reductions:
        try:
            current = masks(source)
        except ValueError:
            current = {s: torch.ones(q.loc.numel(), dtype=torch.bool) for s, q in qs.items()}
        reductions = {"current mask": SavedReduction("mask", {}, current)}
    sites = list(sites) if sites is not None else list(qs)
    missing = [s for s in sites if s not in qs]
    if missing or not sites:
        raise ValueError(f"unknown sites {missing}; the posterior has {list(qs)}")
    fig, axes = _figure(len(sites), len(reductions), width=max(_WIDTH, 5.0 * len(reductions)), sharey="row")
    probs = torch.tensor([0.03, 0.25, 0.5, 0.75, 0.97], dtype=torch.float64)
    for r, site in enumerate(sites):
        q = qs[site]
        z = q.log_theta
        quant = z.icdf(probs.reshape(-1, 1).expand(-1, q.loc.numel())).detach().double().numpy()
        order = np.argsort(quant[2], kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        for c, (label, result) in enumerate(reductions.items()):
            ax = axes[r, c]
            keep = _keep_or_all(result, site, q.loc.numel()).numpy()
            for decided, colour, name in ((keep, KEPT, "kept"), (~keep, PRUNED, "pruned")):
                idx = np.flatnonzero(decided)
                xs = rank[idx]
                ax.add_collection(LineCollection(
                    [[(x, lo), (x, hi)] for x, lo, hi in zip(xs, quant[0, idx], quant[4, idx])],
                    colors=colour, linewidths=0.8, alpha=0.6))
                ax.add_collection(LineCollection(
                    [[(x, lo), (x, hi)] for x, lo, hi in zip(xs, quant[1, idx], quant[3, idx])],
                    colors=colour, linewidths=2.2))
                ax.scatter(xs, quant[2, idx], s=9, color=colour, zorder=3, edgecolors="white",
                           linewidths=0.3, label=f"{name} ({idx.size})")
            low, high = float(q.low.min()), float(q.high.max())
            pad = 0.03 * (high - low)
            ax.set_xlim(-1, q.loc.numel())
            ax.set_ylim(low - pad, high + pad)
            ax.set_title(f"{short_site(site)} - {label}", fontsize=10)
            ax.set_xlabel("structure (sorted by posterior median)")
            if c == 0:
                ax.set_ylabel(r"log $\theta$")
            ax.legend(**_OUTSIDE)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(r"Posterior of log $\theta$ per structure (median, 50 % and 94 % intervals)")
    return fig


# ---------------------------------------------------------------------------- dF


def _delta_f_reductions(reduction: Any, where: str) -> dict[str, Any]:
    reductions = as_reductions(reduction, where)
    chosen = {k: r for k, r in reductions.items() if is_delta_f_method(r.method) and r.scores}
    if not chosen:
        raise ValueError(
            f"{where}: none of the reductions ({[r.method for r in reductions.values()]}) has dF "
            "scores; use a BMRS method (bmrs_n or bmrs_u)"
        )
    return chosen


def _symlog_label(value: float, _pos: Any = None) -> str:
    # Plain numbers where people read them (-1, 0, 1, -10, -100); powers of ten beyond.
    if value == 0:
        return "0"
    if abs(value) < 1e4:
        return f"{value:g}"
    exponent = int(round(math.log10(abs(value))))
    return f"$-10^{{{exponent}}}$" if value < 0 else f"$10^{{{exponent}}}$"


def _margin_of(result: Any) -> Optional[float]:
    options = getattr(result, "options", None) or {}
    margin = options.get("margin")
    if margin is None or options.get("fraction") is not None:
        return None
    try:
        return float(margin)
    except (TypeError, ValueError):
        return None


def plot_delta_f(reduction: Any, *, sites: Optional[Sequence[str]] = None) -> Figure:
    """dF per structure, ranked from most to least prunable, per layer, with the decision line.

    A BMRS rule removes a structure where dF >= -margin (1 nat by default): the shaded side. The
    tie band [-margin, 0), darker, holds the posteriors close to the prior, which the strict rule
    dF >= 0 would keep. The y axis is symmetric-log (linear within +-1 nat): dF of clearly needed
    structures is in the hundreds of nats while the decisions happen near 0. Only reductions
    whose scores are dF are drawn; the legend counts what each one removed.
    """
    reductions = _delta_f_reductions(reduction, "plot_delta_f")
    sites = list(sites) if sites is not None else _sites(reductions)
    margins = sorted({m for r in reductions.values() if (m := _margin_of(r)) is not None})
    fig, axes = _figure(len(sites))
    for r, site in enumerate(sites):
        ax = axes[r, 0]
        lo, hi = -1.0, 1.0
        for i, (label, result) in enumerate(reductions.items()):
            if site not in result.scores:
                continue
            order = np.argsort(-scores_of(result, site).numpy(), kind="stable")
            df = scores_of(result, site).numpy()[order]
            finite = df[np.isfinite(df)]
            if finite.size:
                lo, hi = min(lo, finite.min()), max(hi, finite.max())
            removed = int((~keep_mask(result, site).bool()).sum()) if site in result.keep else 0
            ax.plot(np.arange(1, df.size + 1), df, marker="o", markersize=2.5, linewidth=1.2,
                    color=method_colour(i), label=f"{label}: {removed} of {df.size} removed")
        ax.set_yscale("symlog", linthresh=1.0)
        top = hi * 3 if hi > 1 else 3.0
        ax.set_ylim(lo * 3 if lo < -1 else -3.0, top)
        ax.axhline(0.0, color=OKABE_ITO["black"], linestyle="--", linewidth=0.9, label="dF = 0 (strict rule)")
        for margin in margins:
            ax.axhspan(-margin, top, color=PRUNED, alpha=0.08,
                       label=rf"removed side (dF $\geq$ -{margin:g})" if len(margins) == 1 else None)
            if margin > 0:
                ax.axhspan(-margin, 0, facecolor=PRUNED, alpha=0.14, hatch="///", edgecolor=PRUNED, linewidth=0,
                           label=f"tie band [-{margin:g}, 0)" if margin == margins[0] else None)
            ax.axhline(-margin, color=PRUNED, linewidth=1.4, label=f"decision: dF = -{margin:g}")
        if not margins:
            ax.axhspan(0, top, color=PRUNED, alpha=0.08, label=r"dF $\geq$ 0")
        ax.yaxis.set_major_formatter(FuncFormatter(_symlog_label))
        ax.set_title(short_site(site), fontsize=10)
        ax.set_xlabel("structure rank (largest dF first)")
        ax.set_ylabel("dF (nats, symlog)")
        ax.legend(**_OUTSIDE)
        ax.grid(alpha=0.3)
    fig.suptitle("Change in log evidence dF when a structure's prior is reduced")
    return fig


# ---------------------------------------------------------------------------- densities

_REDUCED_KEYS = {"bmrs_n": ("reduced_loc", "reduced_scale", "reference_code", "margin"),
                 "bmrs_u": ("reduced_low", "reduced_high", "bits", "margin")}


def _reduced_spec(reduced: Any) -> tuple[str, dict]:
    if isinstance(reduced, str):
        method, options = reduced, {}
    elif isinstance(reduced, Mapping):
        options = dict(reduced)
        method = options.pop("method", "bmrs_n")
    elif hasattr(reduced, "method"):
        method, options = reduced.method, dict(getattr(reduced, "options", {}) or {})
    else:
        raise ValueError(f"reduced must be 'bmrs_n', 'bmrs_u', a dict or a reduction result, got {type(reduced).__name__}")
    method = str(method).lower()
    kind = "bmrs_u" if method.startswith("bmrs_u") else "bmrs_n" if method.startswith("bmrs_n") or method == "none" else None
    if kind is None:
        raise ValueError(f"reduced prior densities exist for bmrs_n and bmrs_u only, got {method!r}")
    return kind, {k: v for k, v in options.items() if k in _REDUCED_KEYS[kind] and v is not None}


def plot_reduction_densities(
    source: Any,
    site: str,
    indices: Sequence[int],
    reduced: Any = "bmrs_n",
) -> Figure:
    """Prior, posterior and reduced prior of log theta for chosen structures of one layer.

    The prior is flat on [a, b]; the posterior is the truncated normal; the reduced prior is a
    near point mass at ``reduced_loc`` (default a) for BMRS_N, drawn as an arrow, or flat on
    [a', b'] for BMRS_U (default [a, log 2^-8]). ``reduced`` is ``"bmrs_n"``, ``"bmrs_u"``,
    a dict ``{"method": ..., options}`` or a reduction result (its method and options). The
    legend gives each structure's exact dF and the title the decision under the reduction's
    margin (1 nat by default; ``reference_code`` is the margin 0.919); the y axis is logarithmic
    so the flat prior and a narrow posterior show together.
    """
    qs = posteriors(source)
    if site not in qs:
        raise ValueError(f"unknown site {site!r}; sites: {list(qs)}")
    q = qs[site]
    size = q.loc.numel()
    indices = [int(i) for i in indices]
    if not indices or any(not 0 <= i < size for i in indices):
        raise ValueError(f"indices must be a non-empty list in [0, {size}) for {site!r}, got {indices}")
    kind, opts = _reduced_spec(reduced)
    margin = resolve_margin(opts.get("margin"), bool(opts.get("reference_code", False)))
    keep_given = decided = None
    if hasattr(reduced, "keep") and site in getattr(reduced, "keep", {}):
        keep_given = keep_mask(reduced, site)
        if site in (getattr(reduced, "scores", None) or {}):
            decided = scores_of(reduced, site)
    cols = min(3, len(indices))
    rows = math.ceil(len(indices) / cols)
    fig, axes = _figure(rows, cols, width=4.8 * cols, row_height=4.6)
    for ax in axes.flat[len(indices):]:
        ax.set_visible(False)
    for ax, i in zip(axes.flat, indices):
        loc, scale = float(q.loc[i]), float(q.scale[i])
        a, b = float(q.low.reshape(-1)[i % q.low.numel()]), float(q.high.reshape(-1)[i % q.high.numel()])
        pad = 0.04 * (b - a)
        grid = np.linspace(a, b, 1500)
        near = np.clip(loc + scale * np.linspace(-8, 8, 801), a, b)
        grid = np.unique(np.concatenate([grid, near, [a, b]]))
        one = TruncatedNormal(torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64), a, b)
        dens = one.log_prob(torch.as_tensor(grid)).exp().numpy()
        prior = 1.0 / (b - a)
        peak = max(float(dens.max()), prior)
        bottom = prior * 1e-2
        ax.plot([a, a, b, b], [bottom, prior, prior, bottom], color=NEUTRAL, linewidth=1.6, label=f"prior U({a:g}, {b:g})")
        ax.plot(grid, np.maximum(dens, bottom * 1e-3), color=KEPT, linewidth=1.6,
                label=f"posterior (loc {loc:.2f}, scale {scale:.2g})")
        if kind == "bmrs_n":
            r_loc = float(opts.get("reduced_loc", a))
            r_scale = float(opts.get("reduced_scale", 1e-6))
            df = float(delta_f_log_normal(loc, scale, a, b, r_loc, r_scale))
            ax.annotate("", xy=(r_loc, peak * 3), xytext=(r_loc, bottom),
                        arrowprops={"arrowstyle": "-|>", "color": PRUNED, "linewidth": 2.0, "mutation_scale": 14})
            ax.plot([], [], color=PRUNED, linewidth=2.0, marker="^",
                    label=f"reduced N({r_loc:g}, {r_scale:.0e}$^2$): dF of this posterior {df:.2f}")
        else:
            r_low = float(opts.get("reduced_low", a))
            bits = opts.get("bits")
            r_high = float(opts.get("reduced_high", bits_to_log_bound(bits if bits is not None else 8)))
            df = float(delta_f_log_uniform(loc, scale, a, b, r_low, r_high))
            r_dens = 1.0 / (r_high - r_low)
            ax.plot([r_low, r_low, r_high, r_high], [bottom, r_dens, r_dens, bottom], color=PRUNED,
                    linewidth=1.6, linestyle="--", label=f"reduced U({r_low:g}, {r_high:.2f}): dF of this posterior {df:.2f}")
        # The decision was taken on the posterior of that moment (before any fine-tuning): its dF.
        at_decision = float(decided[i]) if decided is not None and decided.numel() == size else df
        if keep_given is not None:
            verdict = "kept" if bool(keep_given[i]) else "removed"
        else:
            verdict = "removed" if at_decision >= -margin else "kept"
        verdict += f" (dF {at_decision:.2f} {'<' if at_decision < -margin else '>='} -{margin:.3g})"
        ax.set_yscale("log")
        ax.set_ylim(bottom, peak * 12)
        ax.set_xlim(a - pad, b + pad)
        ax.set_title(f"{short_site(site)}[{i}]: {verdict}", fontsize=10)
        ax.set_xlabel(r"log $\theta$")
        ax.set_ylabel("density")
        # Below the axes: a legend inside would cover the posterior wherever it sits.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=9, frameon=False)
    fig.suptitle(f"Prior, posterior and reduced prior ({kind.upper()})")
    return fig


# ---------------------------------------------------------------------------- E[theta]


_DASHES = ("-", "--", ":", "-.")


def _log_ticks(ax, lo: float, hi: float) -> None:
    # Matplotlib labels minor ticks when the range is under a decade, and the labels collide;
    # label 1-2-5 per decade for short ranges, powers of ten otherwise, never the minor ticks.
    if math.log10(hi / lo) <= 2:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_major_formatter(LogFormatterSciNotation())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_e_theta_histograms(source: Any, reduction: Any, *, sites: Optional[Sequence[str]] = None) -> Figure:
    """Histograms of E[theta] per layer: all structures before pruning, the kept ones after.

    One "after" histogram per reduction. Pruned structures are multiplied by 0 after pruning,
    which has no place on the log axis; their count is in the legend instead.
    """
    qs = posteriors(source)
    reductions = as_reductions(reduction, "plot_e_theta_histograms")
    if not reductions:
        raise ValueError("plot_e_theta_histograms needs a reduction (a bmrs_pyro.reduce(...) result)")
    sites = list(sites) if sites is not None else [s for s in qs if any(s in r.keep for r in reductions.values())]
    if not sites:
        raise ValueError(f"the reductions cover none of the posterior's sites {list(qs)}")
    fig, axes = _figure(len(sites))
    for r, site in enumerate(sites):
        ax = axes[r, 0]
        mean = qs[site].mean.detach().double().numpy()
        positive = mean[mean > 0]
        lo = max(positive.min() if positive.size else 1e-12, 1e-300)
        hi = max(positive.max() if positive.size else 1.0, lo * 10)
        bins = np.logspace(math.log10(lo) - 0.05, math.log10(hi) + 0.05, 40)
        ax.hist(positive, bins=bins, histtype="stepfilled", color=NEUTRAL, alpha=0.5,
                label=f"before: all {mean.size}")
        for i, (label, result) in enumerate(reductions.items()):
            keep = _keep_or_all(result, site, mean.size).numpy()
            # Methods often keep the same structures: distinct dashes keep coincident outlines visible.
            ax.hist(mean[keep & (mean > 0)], bins=bins, histtype="step", linewidth=2.2 - 0.4 * (i % 3),
                    linestyle=_DASHES[i % len(_DASHES)], color=method_colour(i), label=f"after {label}: {int(keep.sum())} kept, {int((~keep).sum())} pruned")
        ax.set_xscale("log")
        _log_ticks(ax, lo, hi)
        ax.set_title(short_site(site), fontsize=10)
        ax.set_xlabel(r"E$_q$[$\theta$]")
        ax.set_ylabel("structures")
        ax.legend(**_OUTSIDE)
    fig.suptitle(r"Posterior mean E[$\theta$] before and after pruning")
    return fig


# ---------------------------------------------------------------------------- ELBO


# ---------------------------------------------------------------------------- curves


# ---------------------------------------------------------------------------- widths


