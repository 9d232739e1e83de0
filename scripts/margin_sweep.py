"""How BMRS's decisions move with the evidence margin: one figure and a table for docs/RESULTS.md.

For digits-MLP and MNIST-1D-MLP (the tasks and budget of ``make results``) every seed trains the
multiplicative-noise network once, exactly as the noise-criterion methods of ``make results`` do
(:meth:`bmrs_pyro.baselines.NoiseCriterionMethod.fit_noise_model`), then decides post-training,
without fine-tuning, with

- ``bmrs_n``: BMRS_N (reduced prior: a near point mass at log theta = -20);
- ``bmrs_u8``: BMRS_U-8 on our reduced interval [-20, log 2^-8];
- ``bmrs_u8_authors``: BMRS_U-8 on the authors' reduced interval [log 2^-23, log 2^-8];

at each margin in :data:`MARGINS` (nats): structures with dF >= -margin are removed. It records
the share of hidden structures removed and the test accuracy (deterministic mode) of the masked
network. The margin is a constant of the evidence scale; this sweep shows what it changes, it is
not a way to choose it per task.

    python scripts/margin_sweep.py --seeds 5 --workers 2      # -> docs/margin_sweep.json + figure
    python scripts/margin_sweep.py --quick                    # 1 seed, 3 epochs: a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_results import MODEL_NORM  # noqa: E402  the networks of make results' tasks
#: Margins shown (nats): strict, half, the authors' offset 0.5 log 2pi, the default, and beyond.
MARGINS = (0.0, 0.5, 0.5 * math.log(2 * math.pi), 1.0, 2.0, 3.0)
#: (label, criterion, options) of the decisions compared.
VARIANTS = (
    ("bmrs_n", "bmrs_n", {}),
    ("bmrs_u8", "bmrs_u", {"bits": 8}),
    ("bmrs_u8_authors", "bmrs_u", {"bits": 8, "reduced_low": -23 * math.log(2)}),
)
#: Tasks of ``make results`` that the sweep covers: (key, title, data, hidden).
TASKS = (("digits-mlp", "digits, MLP 64-100-100-10", "digits", (100, 100)),
         ("mnist1d-mlp", "MNIST-1D, MLP 40-100-100-10", "mnist1d", (100, 100)))


def one_seed(task: tuple, seed: int, budget: dict) -> dict:
    """Train one noise network and decide at every margin with every variant."""
    import torch

    torch.set_num_threads(1)
    from bmrs_pyro.baselines import Budget
    from bmrs_pyro.baselines.noise_criteria import noise_methods
    from bmrs_pyro.data import load
    from bmrs_pyro.infer import evaluate
    from bmrs_pyro.models.registry import build
    from bmrs_pyro.pruner import reduce

    key, _, data_name, hidden = task
    data = load(data_name, seed=seed)
    method = noise_methods()["bmrs_n"]
    fitted = method.fit_noise_model(lambda: build("mlp", data.input_shape, data.num_classes, hidden=hidden,
                                                  norm=MODEL_NORM),
                                    data, seed, Budget(**budget), dict(method.defaults))
    model, guide = fitted.model, fitted.guide
    out = {"task": key, "seed": seed, "unpruned": fitted.unpruned_test, "points": []}
    for label, criterion, options in VARIANTS:
        for margin in MARGINS:
            result = reduce(model, guide, criterion, margin=margin, respect_mask=False, **options)
            saved = {s: layer.mask.clone() for s, layer in result.layers.items()}
            result.apply()
            accuracy = evaluate(model, guide, data.test)["accuracy"]
            for s, layer in result.layers.items():
                layer.mask.copy_(saved[s])
            out["points"].append({"variant": label, "margin": margin, "removed": result.fraction_removed,
                                  "accuracy": accuracy})
    return out


def summarise(runs: Sequence[dict]) -> dict:
    """Means over seeds: ``{task: {"unpruned", variant: [(margin, removed %, accuracy %, sd)]}}``."""
    import statistics

    out: dict[str, Any] = {}
    for key, *_ in TASKS:
        mine = [r for r in runs if r["task"] == key]
        if not mine:
            continue
        table: dict[str, Any] = {"unpruned": 100 * statistics.fmean(r["unpruned"] for r in mine), "seeds": len(mine)}
        for label, *_ in VARIANTS:
            rows = []
            for margin in MARGINS:
                pts = [p for r in mine for p in r["points"] if p["variant"] == label and p["margin"] == margin]
                removed = [100 * p["removed"] for p in pts]
                acc = [100 * p["accuracy"] for p in pts]
                rows.append({"margin": margin, "removed": statistics.fmean(removed),
                             "removed_sd": statistics.pstdev(removed), "accuracy": statistics.fmean(acc),
                             "accuracy_sd": statistics.pstdev(acc)})
            table[label] = rows
        out[key] = table
    return out


def figure(summary: dict, path: Path) -> None:
    """Structures removed and accuracy against the margin, one row per task."""
    from matplotlib.figure import Figure

    tasks = [t for t in TASKS if t[0] in summary]
    fig = Figure(figsize=(10, 3.3 * len(tasks) + 0.6), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    styles = {"bmrs_n": ("#0072B2", "o", "BMRS_N"), "bmrs_u8": ("#D55E00", "s", "BMRS_U-8, [-20, log 2^-8]"),
              "bmrs_u8_authors": ("#009E73", "^", "BMRS_U-8, authors' [log 2^-23, log 2^-8]")}
    for row, (key, title, *_rest) in enumerate(tasks):
        table = summary[key]
        for col, (field, label) in enumerate((("removed", "hidden structures removed (%)"),
                                              ("accuracy", "test accuracy (%), no fine-tuning"))):
            ax = axes[row, col]
            for variant, (colour, marker, name) in styles.items():
                rows = table[variant]
                xs = [r["margin"] for r in rows]
                ys = [r[field] for r in rows]
                sd = [r[f"{field}_sd"] for r in rows]
                ax.errorbar(xs, ys, yerr=sd, color=colour, marker=marker, markersize=5, capsize=2, linewidth=1.4,
                            label=name)
            if field == "accuracy":
                ax.axhline(table["unpruned"], color="#777777", linestyle="--", linewidth=1.0, label="unpruned")
                ax.axhline(table["unpruned"] - 1, color="#777777", linestyle=":", linewidth=1.0, label="unpruned - 1 point")
            ax.axvline(1.0, color="black", linewidth=0.8, alpha=0.5)
            ax.axvline(0.5 * math.log(2 * math.pi), color="black", linewidth=0.8, alpha=0.3, linestyle="--")
            ax.set_xlabel("margin (nats): remove where dF >= -margin")
            ax.set_ylabel(label)
            ax.set_title(f"{title} ({table['seeds']} seeds)", fontsize=10)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=8, loc="lower right" if field == "removed" else "lower left")
    fig.suptitle("BMRS decisions against the evidence margin (solid line: the default 1 nat; dashed: 0.919, "
                 "the authors' code)", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor="white")


def markdown(summary: dict, figure_path: str) -> str:
    """The section of docs/RESULTS.md: the figure and one table per task."""
    lines = ["## The evidence margin", "",
             "Post-training decisions on the network every noise method of this page trains (same budget, no "
             "fine-tuning), at margins 0 (the strict rule dF >= 0), 0.5, 0.919 (the authors' code), 1 (the "
             "default), 2 and 3 nats. Generated by `scripts/margin_sweep.py`.", "",
             f"![removed structures and accuracy against the margin]({figure_path})", ""]
    for key, title, *_ in TASKS:
        if key not in summary:
            continue
        table = summary[key]
        lines += [f"**{title}** (unpruned {table['unpruned']:.1f} %, {table['seeds']} seeds): structures removed % "
                  "/ test accuracy %", "",
                  "| margin | " + " | ".join(label for label, *_ in VARIANTS) + " |",
                  "|---|" + "---|" * len(VARIANTS)]
        for i, margin in enumerate(MARGINS):
            cells = [f"{table[label][i]['removed']:.1f} / {table[label][i]['accuracy']:.1f}" for label, *_ in VARIANTS]
            lines.append(f"| {margin:.3g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def run(seeds: int, budget: dict, workers: int, out_json: Path, fig_path: Path) -> dict:
    jobs = [(task, seed) for task in TASKS for seed in range(seeds)]
    t0 = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            runs = list(pool.map(one_seed, [j[0] for j in jobs], [j[1] for j in jobs], [budget] * len(jobs)))
    else:
        runs = [one_seed(task, seed, budget) for task, seed in jobs]
    summary = summarise(runs)
    payload = {"margins": list(MARGINS), "budget": budget, "seconds": time.perf_counter() - t0, "runs": runs,
               "summary": summary}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(payload, indent=1))
    figure(summary, fig_path)
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, written to /tmp")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_results import BUDGET

    budget = {k: BUDGET[k] for k in ("epochs", "batch_size")}
    seeds = args.seeds
    out_json, fig_path = ROOT / "docs" / "margin_sweep.json", ROOT / "docs" / "figures" / "margin-sweep.png"
    if args.quick:
        budget, seeds = dict(budget, epochs=3), 1
        out_json, fig_path = Path("/tmp/margin_sweep.json"), Path("/tmp/margin-sweep.png")
    payload = run(seeds, budget, args.workers, out_json, fig_path)
    print(json.dumps({"seconds": round(payload["seconds"], 1), "json": str(out_json), "figure": str(fig_path),
                      "summary": payload["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
