"""What a finished ``bmrs run`` reports: accuracy and compaction before/after, latency,
structures kept, the decision rule, and the summary table printed at the end."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch


from .checks import positive_int
from .compaction import compact, masked_dense
from .run_config import Experiment
from bmrs_pyro.analysis import SavedReduction


@torch.no_grad()
def measure_latency(module: torch.nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3,
                    threads: Optional[int] = 1) -> float:
    """Median wall time of ``module(x)`` in milliseconds over ``repeats`` runs after ``warmup``.

    On CPU it runs with ``threads`` intra-op threads (default 1, restored afterwards): on a busy
    machine several threads wait on each other and a 0.04 ms forward pass can take 90 ms, which
    would measure the machine rather than the network. ``threads=None`` keeps torch's setting.
    """
    positive_int("repeats", repeats)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    before = torch.get_num_threads()
    if threads is not None and not x.is_cuda:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            module(x)
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 1000.0 * statistics.median(times)


def _removed_pct(before: Optional[float], after: Optional[float]) -> Optional[float]:
    if before in (None, 0) or after is None:
        return None
    return 100.0 * (before - after) / before


def compaction_summary(exp: Experiment, *, latency_batch: int = 256) -> tuple[torch.nn.Module, dict]:
    """Compact the masked model; returns ``(compacted module, metrics part)``.

    Parameters count the backbone before and after; FLOPs are per example (a batch of one);
    latency is the median time of a forward pass on a batch of up to ``latency_batch`` test
    examples, masked dense network (no Pyro, full width) against the compacted one.
    """

    x_test = exp.data.test[0]
    one = x_test[:1].to(exp.device)
    compacted = compact(exp.model, exp.guide, example_input=one)
    stats = compacted.stats
    dense = masked_dense(exp.model, exp.guide)
    batch = x_test[:latency_batch].to(exp.device)
    repeats = exp.config.latency_repeats
    latency = {"before": measure_latency(dense, batch, repeats), "after": measure_latency(compacted, batch, repeats),
               "batch": int(batch.shape[0]), "repeats": repeats, "device": str(exp.device),
               "threads": 1 if exp.device.type == "cpu" else None}
    part = {
        "parameters": {"before": stats["params_before"], "after": stats["params_after"],
                       "removed_pct": _removed_pct(stats["params_before"], stats["params_after"])},
        "flops": {"before": stats["flops_before"], "after": stats["flops_after"],
                  "removed_pct": _removed_pct(stats["flops_before"], stats["flops_after"]), "per": "example"},
        "latency_ms": latency,
        "compaction": {"method": stats["method"], "max_abs_diff": stats["max_abs_diff"], "notes": stats["notes"]},
    }
    return compacted, part


def structure_summary(reduction) -> dict:
    """``structures`` and ``layers`` parts of the metrics from a reduction result."""
    layers = [{"site": site, "kept": int(k), "total": int(t)} for site, (k, t) in reduction.kept_per_layer.items()]
    total = sum(r["total"] for r in layers)
    kept = sum(r["kept"] for r in layers)
    return {"structures": {"total": total, "kept": kept, "removed_pct": 100.0 * (total - kept) / total if total else 0.0},
            "layers": layers}


def decision_summary(reduction) -> dict:
    """``decision`` part of the metrics: the method, its rule in words and, for the BMRS rules,
    the evidence margin and the tie band ``[-margin, 0)``: structures the margin removes although
    the strict rule ``dF >= 0`` would keep them (posteriors close to the prior)."""
    out: dict[str, Any] = {"method": reduction.method, "rule": getattr(reduction, "rule", "") or ""}
    band = reduction.tie_band() if hasattr(reduction, "tie_band") else None
    if band is not None:
        out["margin"] = float(reduction.margin)
        out["tie_band"] = band
    return out


def reduction_to_dict(reduction) -> dict:
    """What a checkpoint keeps of a reduction (method, options, per-site scores and keep masks)."""
    return {"method": reduction.method, "options": dict(getattr(reduction, "options", {}) or {}),
            "scores": {s: torch.as_tensor(v).detach().cpu() for s, v in reduction.scores.items()},
            "keep": {s: torch.as_tensor(v).detach().cpu().bool() for s, v in reduction.keep.items()}}


def reduction_from_dict(data: dict):
    """A :class:`bmrs_pyro.analysis.SavedReduction` from :func:`reduction_to_dict` output."""

    return SavedReduction(data["method"], dict(data["scores"]), dict(data["keep"]), dict(data.get("options") or {}))


def _fmt_int(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) and value is not None else "n/a"


def _fmt_pct(value: Any) -> str:
    return f"{value:.1f} %" if isinstance(value, (int, float)) else "n/a"


def format_summary(metrics: dict, run_dir: Optional[Path] = None) -> str:
    """The plain-text summary table ``bmrs run`` prints: before/after metrics and kept widths."""
    lat = metrics.get("latency_ms", {})
    rows = [
        ("accuracy (test)", f"{100 * metrics['accuracy_before']:.2f} %", f"{100 * metrics['accuracy_after']:.2f} %", ""),
        ("NLL (nats/example)", f"{metrics['nll_before']:.4f}", f"{metrics['nll_after']:.4f}", ""),
        ("structures", _fmt_int(metrics["structures"]["total"]), _fmt_int(metrics["structures"]["kept"]),
         _fmt_pct(metrics["structures"]["removed_pct"])),
        ("parameters", _fmt_int(metrics["parameters"]["before"]), _fmt_int(metrics["parameters"]["after"]),
         _fmt_pct(metrics["parameters"]["removed_pct"])),
        ("FLOPs / example", _fmt_int(metrics["flops"]["before"]), _fmt_int(metrics["flops"]["after"]),
         _fmt_pct(metrics["flops"]["removed_pct"])),
        (f"latency ms (batch {lat.get('batch', '?')})", f"{lat.get('before', float('nan')):.3f}",
         f"{lat.get('after', float('nan')):.3f}", ""),
    ]
    head = ("", "before", "after", "removed")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]

    def line(r):
        return f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()

    title = f"bmrs run: {metrics['data']} / {metrics['model']} / {metrics['method']}"
    if run_dir is not None:
        title += f"  ->  {run_dir}"
    out = [title, line(head), "-" * sum(widths) + "-" * 6]
    out += [line(r) for r in rows]
    layer_w = max([len("layer")] + [len(r["site"]) for r in metrics["layers"]])
    out += ["", f"{'layer':<{layer_w}}  {'kept':>6}  {'total':>6}  {'removed':>8}"]
    for r in metrics["layers"]:
        pct = 100.0 * (r["total"] - r["kept"]) / r["total"] if r["total"] else 0.0
        out.append(f"{r['site']:<{layer_w}}  {r['kept']:>6}  {r['total']:>6}  {pct:>6.1f} %")
    decision = metrics.get("decision") or {}
    if decision.get("rule"):
        out += ["", f"rule: {decision['rule']}"]
    band = decision.get("tie_band")
    if band and band.get("count"):
        out.append(f"tie band: {band['count']} structures have {band['band'][0]:g} <= dF < 0 (posteriors close to "
                   f"the prior: not worth keeping on the evidence); {band['removed']} of them removed")
    return "\n".join(out)
