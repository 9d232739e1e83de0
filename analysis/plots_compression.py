"""Figures of what pruning removed: accuracy against compression and the kept width per layer."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure


from .palette import NEUTRAL, OKABE_ITO, method_colour
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


def plot_accuracy_compression(curves: Mapping[str, Any], *, x: str = "structures") -> Figure:
    """Accuracy against compression (structures or parameters removed, %) for each method.

    ``curves`` maps a method's name to its :class:`~bmrs_pyro.curves.PruneCurve` (or dict);
    methods with a ``stop_point`` (BMRS) get a star where they stop. Accuracies in [0, 1] are
    shown as percentages; the unpruned accuracy (``baseline``), when all curves share it, is a
    dashed line.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict {method: PruneCurve or dict}")
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
