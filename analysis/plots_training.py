"""The training figure: the ELBO per epoch (warm start, SVI, fine-tuning) with the pruning events."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
from matplotlib.figure import Figure


from .palette import KEPT, NEUTRAL, OKABE_ITO, PRUNED
from .plots import _figure
from .sources import az, history_from_idata


def _history_parts(history: Any) -> tuple[np.ndarray, list, np.ndarray]:
    """(ELBO per SVI epoch, events, log likelihood per deterministic warm-start epoch)."""

    if isinstance(history, az.InferenceData):
        history = history_from_idata(history)
        if history is None:
            raise ValueError("the inference data has no 'training' group: pass history= to to_inference_data")
    if isinstance(history, Mapping):
        elbo, events = history.get("elbo"), history.get("events", [])
    elif hasattr(history, "elbo"):
        elbo, events = history.elbo, getattr(history, "events", [])
    else:
        elbo, events = history, []
    try:
        elbo = np.asarray(list(elbo), dtype=float)
    except (TypeError, ValueError):
        raise ValueError("history must be a History, a dict with 'elbo' or a list of floats") from None
    if elbo.ndim != 1 or elbo.size == 0:
        raise ValueError("history has no ELBO values")
    events = list(events or [])
    return elbo, events, _warm_start_part(history, events)


def _warm_start_part(history: Any, events: list) -> np.ndarray:
    """Log likelihood per deterministic warm-start epoch (empty without one)."""
    values = history.get("warm_start") if isinstance(history, Mapping) else getattr(history, "warm_start", None)
    values = np.asarray(list(values or []), dtype=float)
    if values.size == 0:  # only the event survived: the length of the warm start, no values
        ends = [e for e in events if isinstance(e, Mapping) and e.get("event") == "warm_start_end"]
        if ends:
            values = np.full(int(ends[-1].get("epochs", int(ends[-1]["epoch"]) + 1)), np.nan)
    return values


def plot_elbo(history: Any, *, train_epochs: Optional[int] = None) -> Figure:
    """ELBO per epoch, with the share of structures kept after each continuous-pruning step.

    Accepts a :class:`bmrs_pyro.infer.History`, a dict with ``"elbo"`` (and ``"events"``), a
    list of floats or inference data with a ``training`` group. Reductions (``"prune"`` events)
    are drawn as a step line of the structures kept (%, right axis) rather than one line each;
    a resume (``"resume"`` event), the learning-rate anneal (``"anneal_start"``) and the start of
    fine-tuning (``"finetune"`` event, or ``train_epochs``) are marked with labelled vertical lines. A deterministic warm start
    (``history.warm_start``: theta = 1, no KL) comes first on the epoch axis, its log
    likelihood drawn dashed. The y range follows the ELBO after the first epochs (the first
    ones are far below and would flatten the rest); what it leaves out is said in the title.
    """
    elbo, events, warm = _history_parts(history)
    fig, axes = _figure(1, row_height=3.6)
    ax = axes[0, 0]
    epochs = np.arange(1, elbo.size + 1) + warm.size
    ax.plot(epochs, elbo, color=KEPT, marker="o" if elbo.size <= 40 else None, markersize=3, linewidth=1.5,
            label="ELBO")
    if warm.size:
        if np.isfinite(warm).any():
            ax.plot(np.arange(1, warm.size + 1), warm, color=NEUTRAL, linestyle="--", linewidth=1.4,
                    label=r"log likelihood, deterministic warm start ($\theta$ = 1, no KL)")
        ax.axvspan(0.5, warm.size + 0.5, color=NEUTRAL, alpha=0.10)
        ax.annotate("warm start", (warm.size / 2 + 0.5, 0.03), xycoords=("data", "axes fraction"),
                    fontsize=8, ha="center", va="bottom", color=OKABE_ITO["black"])
    title = "Training ELBO per epoch"
    total = elbo.size + warm.size
    finite = elbo[np.isfinite(elbo)]
    if finite.size >= 5:
        skip = max(1, elbo.size // 10)
        tail = elbo[skip:][np.isfinite(elbo[skip:])]
        warm_tail = warm[max(1, warm.size // 10):]
        warm_tail = warm_tail[np.isfinite(warm_tail)]
        low = float(min(tail.min(), warm_tail.min())) if warm_tail.size else float(tail.min())
        high = float(max(tail.max(), warm_tail.max())) if warm_tail.size else float(tail.max())
        span = max(high - low, 1e-9)
        bottom = low - 0.08 * span
        ax.set_ylim(bottom, high + 0.08 * span)
        hidden = int((elbo < bottom).sum())
        if hidden:
            title += f" ({hidden} early epoch{'s' if hidden > 1 else ''} below the range, from {finite.min():.4g})"
    marks = [e for e in events if isinstance(e, Mapping) and "epoch" in e]
    prunes = [e for e in marks if e.get("event", "prune") == "prune" and e.get("fraction_removed") is not None]
    handles, labels = ax.get_legend_handles_labels()
    if prunes:
        twin = ax.twinx()
        xs = [0.5] + [int(e["epoch"]) + 1 for e in prunes] + [total + 0.5]
        kept = [100.0] + [100.0 * (1.0 - float(e["fraction_removed"])) for e in prunes]
        kept.append(kept[-1])
        twin.step(xs, kept, where="post", color=PRUNED, linewidth=1.4)
        twin.plot(xs[1:-1], kept[1:-1], linestyle="none", marker="v", markersize=4, color=PRUNED,
                  label=f"structures kept after each reduction ({prunes[0].get('method', 'reduce')})")
        twin.set_ylim(0, 105)
        twin.set_ylabel("structures kept (%)", color=PRUNED)
        twin.set_xlabel("epoch")  # shared with the ELBO axis; twinx does not draw it twice
        twin.tick_params(axis="y", colors=PRUNED)
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    finetune_at = next((int(e["epoch"]) for e in marks if e.get("event") == "finetune"), train_epochs)
    for at, text, style in ([(int(e["epoch"]), "resumed", ":") for e in marks if e.get("event") == "resume"]
                            + [(int(e["epoch"]), f"weights' rate x {float(e.get('factor', 0.1)):g}", "-.")
                               for e in marks if e.get("event") == "anneal_start"]
                            + ([(finetune_at, "fine-tuning (masks frozen)", "--")]
                               if finetune_at is not None and 0 < finetune_at < total else [])):
        line = ax.axvline(at + 0.5, color=NEUTRAL, linestyle=style, linewidth=1.2)
        ax.annotate(text, (at + 0.5, 0.97), xycoords=("data", "axes fraction"), rotation=90, fontsize=8,
                    color=OKABE_ITO["black"], ha="right", va="top")
        if text not in labels:
            handles, labels = handles + [line], labels + [text]
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats)")
    ax.set_xlim(0.5, total + 0.5)
    fig.suptitle(title, fontsize=10)
    ax.legend(handles, labels, loc="lower right", fontsize=8, framealpha=0.9)
    ax.grid(alpha=0.3)
    return fig
