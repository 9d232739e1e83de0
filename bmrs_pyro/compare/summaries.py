"""``bmrs compare`` summaries: compression within the tolerance, the knee, mean and sd over seeds,
the CSV / Markdown tables, kept widths, and writing / reading a comparison folder."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from kneed import KneeLocator

from ..atomic_io import atomic_write_json, atomic_write_text
from .config import CURVES_FILE, FIGURES, KNEE_SETTINGS, RESULTS_CSV, RESULTS_MD, TOLERANCE, WIDTHS_MD
from .plots import plot_curves


def compression_within(points: Sequence[Mapping], unpruned_accuracy: float,
                       tolerance: float = TOLERANCE) -> tuple[float, float]:
    """(largest % structures removed, largest % parameters removed) among ``points`` whose
    accuracy is at most ``tolerance`` points below ``unpruned_accuracy``.

    Accuracies are fractions in [0, 1], ``tolerance`` is in points (percent). The two maxima are
    taken separately; the unpruned network (0, 0) always qualifies.
    """
    s_best = p_best = 0.0
    for pt in points:
        if 100.0 * (unpruned_accuracy - float(pt["accuracy"])) <= tolerance + 1e-9:
            s_best = max(s_best, float(pt["structures_removed"]))
            p_best = max(p_best, float(pt["parameters_removed"]))
    return s_best, p_best


def knee_point(x: Sequence[float], y: Sequence[float]) -> Optional[tuple[float, float]]:
    """The Kneedle knee ``(x, y)`` of a falling accuracy curve, or None if there is none.

    Points are sorted by ``x``; equal ``x`` are merged by their mean ``y``. Of the candidate knees
    kneed reports (:data:`KNEE_SETTINGS`), the most pronounced is returned: the largest value of
    Kneedle's difference curve, which for a concave decreasing curve normalised to the unit square
    is ``y_n + x_n - 1`` (the height above the chord from the first to the last point). Fewer than
    three distinct ``x``, a flat curve or one with no bend give None.
    """
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    ux = np.unique(xs)
    if ux.size < 3:
        return None
    uy = np.array([ys[xs == v].mean() for v in ux])
    if np.ptp(uy) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kneed warns when it finds no knee; None says so
        kl = KneeLocator(ux, uy, **KNEE_SETTINGS)
    candidates = [float(k) for k in (kl.all_knees or ())]
    if not candidates:
        return None
    xn = (ux - ux[0]) / (ux[-1] - ux[0])
    yn = (uy - uy.min()) / np.ptp(uy)
    height = yn + xn - 1.0
    idx = [int(np.argmin(np.abs(ux - k))) for k in candidates]
    best = max(idx, key=lambda i: height[i])
    return float(ux[best]), float(uy[best])


def _mean_sd(values: Sequence[Optional[float]]) -> tuple[float, float, int]:
    v = np.array([float(a) for a in values if a is not None and np.isfinite(a)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


#: Table columns: key, header, format ("pct": accuracy fraction shown in %, "f1": one decimal, "int").
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("unpruned_acc", "unpruned acc %", "pct"),
    ("within_structures", "struct. removed % (<=1pt)", "f1"),
    ("within_parameters", "params removed % (<=1pt)", "f1"),
    ("stop_structures", "stop: struct. removed %", "f1"),
    ("stop_parameters", "stop: params removed %", "f1"),
    ("stop_acc", "stop: acc %", "pct"),
    ("stop_loss", "stop: acc loss (pts)", "f2"),
    ("knee_parameters", "knee: params removed %", "f1"),
    ("knee_acc", "knee: acc %", "pct"),
    ("params_after", "params at stop", "int"),
    ("flops_after", "FLOPs/example at stop", "int"),
    ("wall_time", "wall time s", "f1"),
)


def per_seed_values(record: Mapping) -> dict[str, Optional[float]]:
    """The table quantities of one method x seed record (None where they do not exist)."""
    base = float(record["unpruned_accuracy"])
    stop = record.get("stop")
    points = list(record["curve"]) + ([stop] if stop else [])
    ws, wp = compression_within(points, base)
    curve = record["curve"]
    knee = knee_point([p["parameters_removed"] for p in curve], [p["accuracy"] for p in curve])
    comp = record.get("compaction") or {}
    return {
        "unpruned_acc": base, "within_structures": ws, "within_parameters": wp,
        "stop_structures": stop["structures_removed"] if stop else None,
        "stop_parameters": stop["parameters_removed"] if stop else None,
        "stop_acc": stop["accuracy"] if stop else None,
        "stop_loss": 100.0 * (base - stop["accuracy"]) if stop else None,
        "knee_parameters": knee[0] if knee else None, "knee_acc": knee[1] if knee else None,
        "params_after": comp.get("params_after"), "flops_after": comp.get("flops_after"),
        "wall_time": record.get("wall_time"),
    }


def summary_rows(records: Sequence[Mapping], methods: Optional[Sequence[str]] = None) -> list[dict]:
    """One row per method: ``<key>_mean``, ``<key>_sd``, ``<key>_n`` for every :data:`COLUMNS` key,
    plus ``seeds`` (that ran), ``failed`` (that raised), ``knee_found`` (seeds with a knee) and
    ``compacted`` (how the parameters were counted)."""
    methods = list(methods) if methods else list(dict.fromkeys(r["method"] for r in records))
    rows = []
    for m in methods:
        failed = sum(1 for r in records if r["method"] == m and "error" in r)
        recs = [r for r in records if r["method"] == m and "error" not in r]
        if not recs and not failed:
            continue
        values = [per_seed_values(r) for r in recs]
        row: dict[str, Any] = {"method": m, "seeds": len(recs), "failed": failed}
        for key, _, _ in COLUMNS:
            mean, sd, n = _mean_sd([v[key] for v in values])
            row.update({f"{key}_mean": mean, f"{key}_sd": sd, f"{key}_n": n})
        row["knee_found"] = sum(v["knee_parameters"] is not None for v in values)
        hows = sorted({(r.get("compaction") or {}).get("how") for r in recs} - {None})
        row["compacted"] = "+".join(hows) if hows else ""
        rows.append(row)
    return rows


def _fmt(mean: float, sd: float, kind: str) -> str:
    if not np.isfinite(mean):
        return "-"
    k = 100.0 if kind == "pct" else 1.0
    if kind == "int":
        text = f"{mean:,.0f}"
        return text if not np.isfinite(sd) else f"{text} ± {sd:,.0f}"
    digits = 2 if kind == "f2" else 1
    text = f"{k * mean:.{digits}f}"
    return text if not np.isfinite(sd) else f"{text} ± {k * sd:.{digits}f}"


def format_markdown(rows: Sequence[Mapping]) -> str:
    """The table as GitHub markdown, mean ± sd over seeds (a dash where a method has no value)."""
    head = ["method", "seeds"] + [h for _, h, _ in COLUMNS] + ["knee found", "counted by"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['method']}`", str(r["seeds"]) + (f" ({r['failed']} failed)" if r.get("failed") else "")]
        cells += [_fmt(r[f"{k}_mean"], r[f"{k}_sd"], kind) for k, _, kind in COLUMNS]
        cells += [f"{r['knee_found']}/{r['seeds']}", r["compacted"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv_text(rows: Sequence[Mapping]) -> str:
    keys = ["method", "seeds", "failed"] + [f"{k}_{s}" for k, _, _ in COLUMNS for s in ("mean", "sd", "n")] + \
        ["knee_found", "compacted"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(r.get(k), float) and not np.isfinite(r[k]) else r.get(k, "")) for k in keys})
    return buf.getvalue()


def kept_width_rows(records: Sequence[Mapping], methods: Optional[Sequence[str]] = None) -> list[dict]:
    """Per method, per noise site: kept structures at the stopping point (mean, sd, total, seeds)."""
    methods = list(methods) if methods else list(dict.fromkeys(r["method"] for r in records))
    rows = []
    for m in methods:
        stops = [r["stop"] for r in records if r["method"] == m and r.get("stop")]  # error records have none
        if not stops:
            continue
        for site in stops[0]["kept_per_layer"]:
            kept = [s["kept_per_layer"][site][0] for s in stops]
            mean, sd, n = _mean_sd(kept)
            rows.append({"method": m, "site": site, "kept_mean": mean, "kept_sd": sd,
                         "total": stops[0]["kept_per_layer"][site][1], "seeds": n})
    return rows


def format_widths(rows: Sequence[Mapping], true_width: Optional[int] = None) -> str:
    """Markdown table of :func:`kept_width_rows` (one column per layer), with the true width if known."""
    sites = list(dict.fromkeys(r["site"] for r in rows))
    totals = {r["site"]: r["total"] for r in rows}
    head = ["method"] + [f"{s} (of {totals[s]})" for s in sites]
    lines = []
    if true_width is not None:
        lines.append(f"True width (the teacher's hidden layer): **{true_width}**.\n")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = [f"`{m}`"]
        for s in sites:
            r = next((r for r in rows if r["method"] == m and r["site"] == s), None)
            cells.append("-" if r is None else _fmt(r["kept_mean"], r["kept_sd"], "f1"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(run_dir: str | os.PathLike, out: Mapping, *, dpi: int = 80) -> dict[str, Path]:
    """Write ``curves.json``, the two figures, ``results.csv``, ``results.md`` and ``widths.md``."""

    run_dir = Path(run_dir)
    records, rows = out["records"], out["rows"]
    methods = out["config"]["methods"]
    saved = {"config": out["config"], "tolerance_points": TOLERANCE, "knee_settings": KNEE_SETTINGS,
             "teacher_width": out.get("teacher_width"), "records": records}
    if out.get("seconds") is not None:
        saved["seconds"] = out["seconds"]
    paths = {"curves": atomic_write_json(run_dir / CURVES_FILE, saved)}
    title = f"{out['config']['data']} / {out['config']['model']}"
    for x, fname in FIGURES.items():
        fig = plot_curves(records, methods, x=x, title=f"{title}: test accuracy against {x} removed\n"
                                                          f"mean ± sd over {out['config']['seeds']} seed(s); "
                                                          "★ = own stopping point (mean ± sd)")
        path = run_dir / fname
        fig.savefig(path, dpi=dpi)
        paths[x] = path
    paths["csv"] = atomic_write_text(run_dir / RESULTS_CSV, _csv_text(rows))
    paths["md"] = atomic_write_text(run_dir / RESULTS_MD, format_markdown(rows) + "\n")
    paths["widths"] = atomic_write_text(run_dir / WIDTHS_MD, format_widths(kept_width_rows(records, methods),
                                                                           out.get("teacher_width")) + "\n")
    return paths


def load_comparison(run_dir: str | os.PathLike) -> dict:
    """``curves.json`` of a comparison folder, with ``rows`` recomputed."""
    path = Path(run_dir) / CURVES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a folder written by `bmrs compare`")
    data = json.loads(path.read_text())
    data["rows"] = summary_rows(data["records"], data["config"]["methods"])
    return data
