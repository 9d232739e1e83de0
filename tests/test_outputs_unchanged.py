"""`bmrs run` and `bmrs compare` write the same files, metrics keys and CSV columns as before the
issue-12 restructuring (names recorded on commit fe008a2 with the commands below; values are not
compared, only names, so that a refactor that drops or renames an output fails here)."""
from __future__ import annotations

import csv
import json

import pytest

from bmrs_pyro.cli import main

RUN_FILES = {
    ".lock", "checkpoint.pt", "compacted.pt", "compacted_state.pt", "config.json", "final.pt",
    "inference_data.nc", "metrics.json", "report.html", "figures/delta_f.png",
    "figures/e_theta_histograms.png", "figures/elbo.png", "figures/kept_width.png",
    "figures/posterior_forest.png", "figures/reduction_densities.png",
}
METRICS_KEYS = {
    "accuracy_after", "accuracy_before", "compaction", "data", "decision", "elbo", "epochs", "evaluated_on",
    "flops", "latency_ms", "layers", "method", "model", "nll_after", "nll_before", "parameters",
    "pruning_events", "seconds", "seconds_total", "structures", "train_seconds", "warm_start",
}
# config.json gains keys on purpose: "nproc", the data-parallel ranks a resume must match (issue 14), and
# "norm", the BatchNorm option of the zoo's mlp and lenet5, and "anneal_epochs", the learning-rate anneal of
# the training recipe (both issue 11).
CONFIG_KEYS = {
    "activation", "batch_size", "bits", "bmrs_pyro_version", "command", "data", "device", "epochs",
    "finetune_epochs", "fraction", "guide_lr", "hidden", "kl_weight", "latency_repeats", "lr", "margin",
    "anneal_epochs", "method", "model", "name", "norm", "nproc", "output", "posterior_samples", "prune_every", "prune_start", "pyro_version",
    "quiet", "reference_code", "report", "root", "seed", "threads", "torch_version", "warm_start_epochs",
}
COMPARE_FILES = {".lock", "accuracy_parameters.png", "accuracy_structures.png", "curves.json", "results.csv",
                 "results.md", "widths.md"}
CSV_COLUMNS = ["method", "seeds", "failed"] + [
    f"{name}_{stat}"
    for name in ("unpruned_acc", "within_structures", "within_parameters", "stop_structures", "stop_parameters",
                 "stop_acc", "stop_loss", "knee_parameters", "knee_acc", "params_after", "flops_after", "wall_time")
    for stat in ("mean", "sd", "n")
] + ["knee_found", "compacted"]
CURVES_KEYS = {"config", "knee_settings", "records", "teacher_width", "tolerance_points"}
RECORD_KEYS = {"compaction", "curve", "method", "num_parameters", "num_structures", "seed", "stop",
               "unpruned_accuracy", "unpruned_val_accuracy", "wall_time"}


def _files(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_bmrs_run_writes_the_same_files_and_keys(tmp_path):
    rc = main(["run", "--epochs", "2", "--hidden", "16", "--batch-size", "256", "--finetune-epochs", "1",
               "--warm-start-epochs", "0", "--quiet", "--method", "bmrs_n", "--prune-every", "1",
               "--output", str(tmp_path), "--name", "r", "--seed", "0"])
    assert rc == 0
    run = tmp_path / "r"
    assert _files(run) == RUN_FILES
    assert set(json.loads((run / "metrics.json").read_text())) == METRICS_KEYS
    assert set(json.loads((run / "config.json").read_text())) == CONFIG_KEYS


@pytest.mark.slow
def test_bmrs_compare_writes_the_same_files_and_columns(tmp_path):
    rc = main(["compare", "--quick", "--data", "digits", "--model", "mlp", "--hidden", "12,8",
               "--methods", "bmrs_n,l2", "--seeds", "1", "--epochs", "1", "--output", str(tmp_path),
               "--name", "c", "--quiet"])
    assert rc == 0
    folder = tmp_path / "c"
    assert _files(folder) == COMPARE_FILES
    with open(folder / "results.csv", newline="") as fh:
        assert next(csv.reader(fh)) == CSV_COLUMNS
    saved = json.loads((folder / "curves.json").read_text())
    assert set(saved) == CURVES_KEYS
    assert {r["method"] for r in saved["records"]} == {"bmrs_n", "l2"}
    assert all(set(r) == RECORD_KEYS for r in saved["records"])
