"""Figures of what pruning removed: accuracy against compression and the kept width per layer."""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .palette import METHOD_CYCLE, NEUTRAL, OKABE_ITO, method_colour
from .plots import _OUTSIDE, _WIDTH, _figure, short_site
from .sources import as_reductions, kept_total


_X_KEYS = {"structures": ("structures_removed", "structures_removed_pct", "struct"),
           "parameters": ("parameters_removed", "parameters_removed_pct", "param")}


def _pick(point: Mapping, candidates: Sequence[str], what: str) -> float:
    for key in candidates:
        if key in point:
            return float(point[key])
    for key in point:
        if any(c in str(key).lower() for c in candidates[-1:]):
            return float(point[key])
    raise ValueError(f"curve point {dict(point)} has no {what} value (expected one of {list(candidates)})")


def curve_points(curve: Any, x: str = "structures") -> tuple[np.ndarray, np.ndarray, Optional[tuple[float, float]]]:
    """(x %, accuracy, stop point or None) of a :class:`bmrs_pyro.curves.PruneCurve` or its dict.

    Points are read from ``curve.to_dict()["points"]`` (or a dict with ``"points"``), each a dict
    with ``structures_removed`` / ``parameters_removed`` (%) and ``accuracy`` (other names
    containing "struct", "param", "acc" are accepted too); ``stop_point`` is an optional point
    alike.
    """
    if x not in _X_KEYS:
        raise ValueError(f"x must be 'structures' or 'parameters', got {x!r}")
    data = curve.to_dict() if hasattr(curve, "to_dict") else curve
    if not isinstance(data, Mapping) or "points" not in data:
        raise ValueError("a curve must be a PruneCurve or a dict with 'points' (list of dicts)")
    points = [p if isinstance(p, Mapping) else vars(p) for p in data["points"]]
    if not points:
        raise ValueError("the curve has no points")
    acc_keys = ("accuracy", "acc")
    xs = np.array([_pick(p, _X_KEYS[x], x) for p in points])
    ys = np.array([_pick(p, acc_keys, "accuracy") for p in points])
    stop = data.get("stop_point")
    stop_xy = None
    if stop:
        stop = stop if isinstance(stop, Mapping) else vars(stop)
        stop_xy = (_pick(stop, _X_KEYS[x], x), _pick(stop, acc_keys, "accuracy"))
    order = np.argsort(xs, kind="stable")
    return xs[order], ys[order], stop_xy


def _baseline_accuracy(curve: Any) -> Optional[float]:
    data = curve.to_dict() if hasattr(curve, "to_dict") else curve
    base = data.get("baseline") if isinstance(data, Mapping) else None
    value = base.get("accuracy") if isinstance(base, Mapping) else None
    return None if value is None else float(value)


def plot_accuracy_compression(curves: Mapping[str, Any], *, x: str = "structures", band: bool = False,
                              panels: Optional[Sequence[tuple[str, Sequence[str]]]] = None,
                              reference: Optional[str] = None, title: str = "") -> Figure:
    """Accuracy against compression (structures or parameters removed, %) for each method: the one
    accuracy-vs-compression figure of the package (``bmrs compare`` draws its figures with it,
    through :func:`bmrs_pyro.compare.plot_curves`).

    ``band=False`` (default): ``curves`` maps a method's name to its
    :class:`~bmrs_pyro.curves.PruneCurve` (or dict with ``points`` and ``stop_point``); each
    method's points are drawn as a line with markers, a star where a method stops (BMRS).
    Accuracies in [0, 1] are shown as percentages; the unpruned accuracy (``baseline``), when all
    curves share it, is a dashed line.

    ``band=True`` (several seeds): ``curves`` maps a method's name to a list of records, one per
    seed, each a dict with ``curve`` (points with ``structures_removed`` / ``parameters_removed``
    in % and ``accuracy`` in [0, 1]), ``stop`` (a point or None) and ``unpruned_accuracy``. Per
    method the mean curve over seeds with a +- 1 sd band and the stopping point (mean +- sd, a star
    with error bars; stars at the same place nest, the first method's largest). The top row shows
    the whole range, the bottom row zooms on the top of the curves. ``panels``: ``[(subtitle,
    methods), ...]`` side by side (default: one panel with every method); ``reference``: a method
    repeated in several panels, always blue; ``title``: the figure's title.
    """
    if x not in _X_KEYS:
        raise ValueError(f"x must be 'structures' or 'parameters', got {x!r}")
    if band:
        if not isinstance(curves, Mapping):
            raise ValueError("curves must be a dict {method: list of per-seed records}")
        return _plot_bands(curves, x, [("", list(curves))] if panels is None else panels, reference, title)
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict {method: PruneCurve or dict}")
    return _plot_single(curves, x)


def _styles(group: Sequence[str], reference: Optional[str] = None) -> dict[str, tuple[str, str]]:
    """Colour and line style per method of one panel: distinct colours within the panel (Okabe-Ito,
    yellow last), ``reference`` always blue; past the palette the lines turn dashed."""
    blue = METHOD_CYCLE[0]
    free = [c for c in METHOD_CYCLE if c != blue] if reference in group else list(METHOD_CYCLE)
    out, i = {}, 0
    for m in group:
        if m == reference:
            out[m] = (blue, "-")
            continue
        out[m] = (free[i % len(free)], "-" if i < len(free) else "--")
        i += 1
    return out


def _mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], grid: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd over seeds of the curves interpolated on ``grid`` (NaN where fewer than half cover)."""
    rows = []
    for xs, ys in curves:
        ux = np.unique(xs)
        uy = np.array([ys[xs == v].mean() for v in ux])
        row = np.full(grid.shape, np.nan)
        if ux.size == 1:
            row[np.isclose(grid, ux[0], atol=0.26)] = uy[0]
        else:
            inside = (grid >= ux[0]) & (grid <= ux[-1])
            row[inside] = np.interp(grid[inside], ux, uy)
        rows.append(row)
    a = np.array(rows)
    count = np.isfinite(a).sum(0)
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(a, 0)
            sd = np.nanstd(a, 0)
    enough = count >= max(1, math.ceil(len(curves) / 2))
    mean[~enough] = np.nan
    sd[~enough] = np.nan
    return mean, sd


def _plot_bands(curves: Mapping[str, Sequence[Mapping]], x: str, panels: Sequence[tuple[str, Sequence[str]]],
                ref: Optional[str], title: str) -> Figure:
    """Mean +- sd over seeds per method, in panels (see :func:`plot_accuracy_compression`)."""
    key = f"{x}_removed"
    fig = Figure(figsize=(6.2 * len(panels), 7.4), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex=True, height_ratios=[1.0, 1.25])
    grid = np.linspace(0.0, 100.0, 401)
    tops, bases = [], []
    for col, (sub, group) in enumerate(panels):
        styles = _styles(group, ref)
        handles = []
        for j, m in enumerate(group):
            colour, ls = styles[m]
            recs = list(curves.get(m, ()))
            bases += [100 * r["unpruned_accuracy"] for r in recs]
            seeds = [(np.array([p[key] for p in r["curve"]], float),
                      100 * np.array([p["accuracy"] for p in r["curve"]])) for r in recs if r["curve"]]
            mean, sd = _mean_band(seeds, grid) if seeds else (np.full(grid.shape, np.nan),) * 2
            ok = np.isfinite(mean)
            stops = [r["stop"] for r in recs if r.get("stop")]
            size = max(7.0, 17.0 - 1.6 * j)
            for ax in axes[:, col]:
                if ok.any():
                    ax.plot(grid[ok], mean[ok], color=colour, linestyle=ls, linewidth=1.5)
                    ax.fill_between(grid, mean - sd, mean + sd, where=ok, color=colour, alpha=0.13, linewidth=0)
                if stops:
                    sx = np.array([st[key] for st in stops], float)
                    sy = 100 * np.array([st["accuracy"] for st in stops], float)
                    ax.errorbar([sx.mean()], [sy.mean()], xerr=[sx.std()], yerr=[sy.std()], fmt="*",
                                markersize=size, color=colour, markeredgecolor="black", markeredgewidth=0.6,
                                elinewidth=0.9, capsize=2, zorder=5 + j)
                    tops.append(float(sy.mean()))
            if ok.any():
                tops.append(float(np.nanmax(mean)))
            handles.append(Line2D([], [], color=colour, linestyle=ls, linewidth=1.5, marker="*" if stops else None,
                                  markersize=9, markeredgecolor="black", markeredgewidth=0.5,
                                  label=m if stops else f"{m} (no stop rule)"))
        top, zoom = axes[0, col], axes[1, col]
        top.set_title(sub, fontsize=9)
        top.set_ylim(0, 101)
        zoom.legend(handles=handles, loc="lower left", fontsize=7.5, framealpha=0.92, ncol=2 if len(group) > 4 else 1)
        for ax in (top, zoom):
            ax.set_xlim(-2, 102)
            ax.grid(alpha=0.3)
        zoom.set_xlabel(f"{x} removed (%)")
    if bases and tops:
        hi = max(tops + bases)
        lo = min(bases) - 6.0
        for ax in axes[1, :]:
            ax.set_ylim(lo, hi + 1.0)
    axes[0, 0].set_ylabel("test accuracy (%)")
    axes[1, 0].set_ylabel("test accuracy (%), zoomed")
    fig.suptitle(title or f"Accuracy against {x} removed\nmean ± sd over seeds; ★ = own stopping point",
                 fontsize=10)
    return fig


def _plot_single(curves: Mapping[str, Any], x: str) -> Figure:
    """One curve per method, its points as markers (see :func:`plot_accuracy_compression`)."""
    parsed = {m: curve_points(c, x) for m, c in curves.items()}
    as_pct = all(max(ys.max(), s[1] if s else 0.0) <= 1.0 for _, ys, s in parsed.values())
    k = 100.0 if as_pct else 1.0
    fig, axes = _figure(1, row_height=4.2)
    ax = axes[0, 0]
    baselines = {_baseline_accuracy(c) for c in curves.values()} - {None}
    if len(baselines) == 1:
        # Every curve starts from the same trained network: its accuracy is the reference.
        ax.axhline(baselines.pop() * k, color=NEUTRAL, linestyle="--", linewidth=1.0, label="unpruned")
    for i, (method, (xs, ys, stop)) in enumerate(parsed.items()):
        colour = method_colour(i)
        ax.plot(xs, ys * k, color=colour, linewidth=1.5, marker="o", markersize=3, label=method)
        if stop is not None:
            ax.plot([stop[0]], [stop[1] * k], linestyle="none", marker="*", markersize=15, color=colour,
                    markeredgecolor=OKABE_ITO["black"], markeredgewidth=0.8, label=f"{method} stop ({stop[0]:.0f}%)")
    ax.set_xlabel(f"{x} removed (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(-2, 102)
    ax.set_title(f"Accuracy against compression ({x})", fontsize=10)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    ax.grid(alpha=0.3)
    return fig


def plot_kept_width(source: Any) -> Figure:
    """Kept width per layer: the total as a grey bar, what each method keeps as coloured bars.

    ``source`` is a reduction, a list / dict of reductions, or ``{site: (kept, total)}``.
    """
    if isinstance(source, Mapping) and source and all(
        isinstance(v, (tuple, list)) and len(v) == 2 for v in source.values()
    ):
        tables = {"kept": kept_total(source)}
    else:
        reductions = as_reductions(source, "plot_kept_width")
        if not reductions:
            raise ValueError("plot_kept_width needs a reduction or {site: (kept, total)}")
        tables = {label: kept_total(r) for label, r in reductions.items()}
    sites = []
    for table in tables.values():
        sites += [s for s in table if s not in sites]
    totals = {}
    for table in tables.values():
        for s, (_, total) in table.items():
            if totals.setdefault(s, total) != total:
                raise ValueError(f"{s}: the reductions disagree on the number of structures")
    fig, axes = _figure(1, width=max(_WIDTH, 0.9 * len(sites) * max(1, len(tables)) + 2), row_height=3.6)
    ax = axes[0, 0]
    xs = np.arange(len(sites))
    group = 0.8
    ax.bar(xs, [totals[s] for s in sites], width=group, color=NEUTRAL, alpha=0.35, label="total")
    bar_w = group / len(tables)
    for i, (label, table) in enumerate(tables.items()):
        offs = xs - group / 2 + bar_w * (i + 0.5)
        kept = [table.get(s, (0, totals[s]))[0] for s in sites]
        bars = ax.bar(offs, kept, width=bar_w * 0.9, color=method_colour(i), label=label if len(tables) > 1 else "kept")
        for bar, s, k in zip(bars, sites, kept):
            ax.annotate(f"{k}/{totals[s]}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [short_site(s) for s in sites], rotation=30 if len(sites) > 6 else 0, ha="right" if len(sites) > 6 else "center")
    ax.set_ylim(0, max(totals.values()) * 1.15)
    ax.set_xlabel("layer")
    ax.set_ylabel("structures")
    ax.set_title("Kept width per layer", fontsize=10)
    ax.legend(**_OUTSIDE)
    return fig
