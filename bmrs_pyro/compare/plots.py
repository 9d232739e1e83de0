"""``bmrs compare`` figures: accuracy against compression, the mean curve per method over seeds
with a band of +- 1 sd and each method's stopping point."""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from bmrs_pyro.analysis.palette import METHOD_CYCLE

from ..baselines import METHODS, NoiseCriterionMethod
from .config import FIGURES


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


def plot_curves(records: Sequence[Mapping], methods: Sequence[str], *, x: str = "parameters", title: str = ""):
    """Accuracy (%) against % ``x`` removed (``"structures"`` or ``"parameters"``): per method the
    mean curve over seeds with a +- 1 sd band and its stopping point (mean +- sd, a star with
    error bars; stars at the same place nest, the first method's largest). The top row shows the
    whole range, the bottom row zooms on the top of the curves where the 1-point budget lies.
    More than six methods are split into two columns: the multiplicative-noise criteria, and the
    other methods with BMRS_N repeated for reference. Returns a Figure."""
    if x not in FIGURES:
        raise ValueError(f"x must be one of {tuple(FIGURES)}, got {x!r}")
    key = f"{x}_removed"
    present = [m for m in methods if any(r["method"] == m and "error" not in r for r in records)]
    noise = [m for m in present if isinstance(METHODS.get(m), NoiseCriterionMethod)]
    others = [m for m in present if m not in noise]
    ref = None
    if len(present) > 6 and noise and others:
        ref = "bmrs_n" if "bmrs_n" in noise else noise[0]
        panels = [("multiplicative-noise criteria", noise), (f"other methods ({ref} for reference)", [ref] + others)]
    else:
        panels = [("", present)]
    fig = Figure(figsize=(6.2 * len(panels), 7.4), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex=True, height_ratios=[1.0, 1.25])
    grid = np.linspace(0.0, 100.0, 401)
    tops, bases = [], []
    for col, (sub, group) in enumerate(panels):
        styles = _styles(group, ref)
        handles = []
        for j, m in enumerate(group):
            colour, ls = styles[m]
            recs = [r for r in records if r["method"] == m and "error" not in r]
            bases += [100 * r["unpruned_accuracy"] for r in recs]
            curves = [(np.array([p[key] for p in r["curve"]], float),
                       100 * np.array([p["accuracy"] for p in r["curve"]])) for r in recs if r["curve"]]
            mean, sd = _mean_band(curves, grid) if curves else (np.full(grid.shape, np.nan),) * 2
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
