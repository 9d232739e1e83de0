"""`bmrs compare`: the end-to-end command, the table's quantities on constructed curves, errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from bmrs_pyro.baselines import METHODS
from bmrs_pyro.cli import main
from bmrs_pyro.compare import (
    COLUMNS,
    compression_within,
    format_markdown,
    iter_noise_methods,
    knee_point,
    kept_width_rows,
    per_seed_values,
    resolve_methods,
    summary_rows,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pt(s, p, acc, kept=None):
    return {"structures_removed": s, "parameters_removed": p, "accuracy": acc, "val_accuracy": acc,
            "step": None, "kept_per_layer": kept or {}}


# ---------------------------------------------------------------------------- end to end


def test_compare_end_to_end_writes_every_file(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--quick", "--data", "digits", "--model", "mlp", "--hidden", "12,8",
               "--methods", "bmrs_n,iap", "--seeds", "2", "--epochs", "1", "--output", str(out), "--name", "t",
               "--quiet"])
    assert rc == 0
    folder = out / "t"
    for name in ("curves.json", "results.csv", "results.md", "widths.md", "accuracy_structures.png",
                 "accuracy_parameters.png"):
        assert (folder / name).stat().st_size > 0, name
    for png in ("accuracy_structures.png", "accuracy_parameters.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (folder / png).stat().st_size < 200_000

    saved = json.loads((folder / "curves.json").read_text())
    records = saved["records"]
    assert sorted((r["method"], r["seed"]) for r in records) == [("bmrs_n", 0), ("bmrs_n", 1), ("iap", 0), ("iap", 1)]
    assert saved["config"]["epochs"] == 1 and saved["config"]["data_options"] == {"subset": 400}
    for r in records:
        assert r["curve"] and r["stop"] is not None
        assert r["curve"][0]["structures_removed"] == 0.0
        assert set(r["stop"]["kept_per_layer"]) == {"net.3.theta", "net.6.theta"}
        # parameters and FLOPs of the compacted network: never more than before, and a real count
        comp = r["compaction"]
        assert comp["how"] == "compaction"
        assert 0 < comp["params_after"] <= comp["params_before"] == r["num_parameters"]
        assert 0 < comp["flops_after"] <= comp["flops_before"]
    # the unpruned 64-12-8-10 network: 64*12+12 + 12*8+8 + 8*10+10 parameters
    assert records[0]["num_parameters"] == 64 * 12 + 12 + 12 * 8 + 8 + 8 * 10 + 10

    with open(folder / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    expected = ["method", "seeds", "failed"] + [f"{k}_{s}" for k, _, _ in COLUMNS for s in ("mean", "sd", "n")] + \
        ["knee_found", "compacted"]
    assert list(rows[0]) == expected
    assert [r["method"] for r in rows] == ["bmrs_n", "iap"]
    assert all(r["seeds"] == "2" for r in rows)
    # the table's unpruned accuracy is the mean of the two seeds' records
    for row in rows:
        accs = [r["unpruned_accuracy"] for r in records if r["method"] == row["method"]]
        assert float(row["unpruned_acc_mean"]) == pytest.approx(np.mean(accs))
        assert float(row["wall_time_mean"]) > 0

    printed = capsys.readouterr().out
    assert printed.startswith("| method | seeds | unpruned acc % |")
    assert "`bmrs_n`" in printed and "`iap`" in printed
    assert (folder / "results.md").read_text().strip() == printed.strip()
    assert "net.3.theta (of 12)" in (folder / "widths.md").read_text()

    # a second run into the same folder is refused unless --overwrite
    rc = main(["compare", "--quick", "--methods", "iap", "--seeds", "1", "--output", str(out), "--name", "t",
               "--quiet"])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err


def test_shared_fit_gives_the_same_results_as_separate_runs():
    from bmrs_pyro.data import load
    from bmrs_pyro.models import mlp

    data = load("digits", seed=1, subset=240)
    builder = lambda: mlp(64, 10, hidden=(10, 6))  # noqa: E731
    budget = {"epochs": 2, "finetune_epochs": 1}
    names = ["bmrs_n", "snr", "l2"]
    opts = {n: {"fraction_step": 0.5} for n in names}
    shared = {r.method: r.to_dict() for r in iter_noise_methods(names, builder, data, seed=3, budget=budget,
                                                                options=opts)}
    for n in names:
        alone = METHODS[n].run(builder, data, seed=3, budget=budget, fraction_step=0.5).to_dict()
        for key in ("unpruned_accuracy", "unpruned_val_accuracy", "curve", "stop", "num_parameters"):
            assert shared[n][key] == alone[key], (n, key)
    with pytest.raises(ValueError, match="not a multiplicative-noise criterion"):
        next(iter_noise_methods(["iap"], builder, data))


# ---------------------------------------------------------------------------- the quantities


def test_compression_within_one_point_on_a_constructed_curve():
    # unpruned 0.950: points at 0.940 (exactly 1 point lower) qualify, 0.9399 does not
    curve = [_pt(0, 0, 0.95), _pt(20, 25, 0.955), _pt(40, 48, 0.94), _pt(60, 70, 0.9399), _pt(80, 90, 0.5)]
    assert compression_within(curve, 0.95) == (40.0, 48.0)
    # the two maxima are separate: a later point may remove more parameters but fewer structures
    odd = [_pt(50, 30, 0.95), _pt(30, 60, 0.95), _pt(90, 95, 0.2)]
    assert compression_within(odd, 0.95) == (50.0, 60.0)
    # nothing qualifies but the unpruned network itself
    assert compression_within([_pt(10, 10, 0.5)], 0.95) == (0.0, 0.0)
    assert compression_within(curve, 0.95, tolerance=50.0) == (80.0, 90.0)


def test_kneedle_finds_the_corner_of_a_constructed_curve():
    # flat at 96 % up to 60 % removed, then a straight fall to 10 %: the knee is the corner
    x = np.arange(0, 101, 10.0)
    y = np.where(x <= 60, 0.96, 0.96 - (x - 60) / 40 * 0.86)
    knee = knee_point(x, y)
    assert knee is not None
    assert knee[0] == 60.0 and knee[1] == pytest.approx(0.96)
    # order does not matter; duplicated x are merged by their mean
    perm = np.random.default_rng(0).permutation(x.size)
    assert knee_point(x[perm], y[perm]) == knee
    assert knee_point(np.r_[x, 60.0], np.r_[y, 0.90])[0] == 60.0


def test_kneedle_takes_the_top_corner_when_the_curve_has_a_floor():
    # flat, a collapse, then a flat floor at chance: two bends; the knee is the top one (77.5 %),
    # where the curve stands highest above the chord from (0, 0.95) to (99.6, 0.10)
    x = [0.0, 13.5, 27.1, 39.0, 50.4, 61.5, 70.0, 77.5, 82.9, 89.6, 99.6]
    y = [0.95, 0.95, 0.95, 0.953, 0.95, 0.947, 0.961, 0.936, 0.638, 0.10, 0.10]
    chord = [(yi - 0.10) / 0.861 + xi / 99.6 - 1 for xi, yi in zip(x, y)]
    assert int(np.argmax(chord)) == 7
    assert knee_point(x, y) == (77.5, 0.936)


def test_kneedle_reports_no_knee_where_there_is_none():
    x = np.arange(0, 101, 10.0)
    assert knee_point(x, 0.9 - 0.008 * x) is None          # a straight line bends nowhere
    assert knee_point(x, np.full(x.shape, 0.9)) is None    # flat
    assert knee_point([0, 50], [0.9, 0.1]) is None          # too few points
    assert knee_point([0, 0, 50, 50], [0.9, 0.9, 0.1, 0.1]) is None


def test_summary_rows_mean_and_sd_over_seeds_by_hand():
    kept = {"a": [3, 8]}
    r0 = {"method": "m", "seed": 0, "unpruned_accuracy": 0.90, "wall_time": 2.0,
          "curve": [_pt(0, 0, 0.90), _pt(50, 60, 0.895), _pt(90, 95, 0.30)],
          "stop": _pt(25, 30, 0.88, kept), "compaction": {"how": "compaction", "params_after": 100, "flops_after": 200}}
    r1 = {"method": "m", "seed": 1, "unpruned_accuracy": 0.80, "wall_time": 4.0,
          "curve": [_pt(0, 0, 0.80), _pt(50, 62, 0.70), _pt(90, 96, 0.20)],
          "stop": _pt(75, 80, 0.79, {"a": [5, 8]}), "compaction": {"how": "count_parameters", "params_after": 50,
                                                                   "flops_after": None}}
    failed = {"method": "m", "seed": 2, "error": "ValueError: diverged"}
    none = {"method": "n", "seed": 0, "unpruned_accuracy": 0.9, "wall_time": 1.0,
            "curve": [_pt(0, 0, 0.9), _pt(10, 10, 0.9)], "stop": None, "compaction": None}
    (row, row_n) = summary_rows([r0, r1, failed, none], ["m", "n"])
    assert row["seeds"] == 2 and row["failed"] == 1
    assert row["unpruned_acc_mean"] == pytest.approx(0.85)
    assert row["unpruned_acc_sd"] == pytest.approx(math.sqrt(2) * 0.05)  # sample sd of {0.9, 0.8}
    # seed 0: 50 % / 60 % within 1 point (0.895); seed 1: the stop (75 %, 80 %, 0.79) is within 1 point
    assert row["within_structures_mean"] == pytest.approx((50 + 75) / 2)
    assert row["within_parameters_mean"] == pytest.approx((60 + 80) / 2)
    assert row["stop_loss_mean"] == pytest.approx((2.0 + 1.0) / 2)
    assert row["params_after_mean"] == 75 and row["flops_after_n"] == 1 and row["flops_after_mean"] == 200
    assert row["wall_time_mean"] == 3.0 and row["compacted"] == "compaction+count_parameters"
    # no stopping point: blanks, not zeros
    assert row_n["stop_structures_n"] == 0 and math.isnan(row_n["stop_acc_mean"])
    table = format_markdown([row, row_n])
    assert "| `m` | 2 (1 failed) | 85.0 ± 7.1 |" in table
    assert table.splitlines()[-1].startswith("| `n` | 1 | 90.0 | 10.0 | 10.0 | - | - | - |")
    widths = kept_width_rows([r0, r1, failed, none])
    assert widths == [{"method": "m", "site": "a", "kept_mean": 4.0, "kept_sd": pytest.approx(math.sqrt(2)),
                       "total": 8, "seeds": 2}]
    assert per_seed_values(none)["knee_parameters"] is None


# ---------------------------------------------------------------------------- errors


def test_method_names_are_checked():
    assert resolve_methods("all") == list(METHODS)
    assert resolve_methods(" iap, bmrs_n,iap ") == ["iap", "bmrs_n"]
    with pytest.raises(ValueError, match="unknown method.*nope.*valid methods: all, bmrs_n"):
        resolve_methods("bmrs_n,nope")
    with pytest.raises(ValueError, match="no method given"):
        resolve_methods(",")


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "bmrs_n,nope"], "valid methods: all, bmrs_n"),
    (["--data", "nope"], "invalid choice: 'nope' (choose from 'digits'"),
    (["--model", "nope"], "invalid choice: 'nope' (choose from 'mlp'"),
    (["--model", "lenet5", "--hidden", "10"], "--hidden applies to --model mlp only"),
    (["--seeds", "0"], "seeds must be an integer >= 1"),
    (["--fraction-step", "0"], "fraction_step must be in (0, 1]"),
    (["--data", "mnist1d", "--model", "lenet5"], "lenet5 needs image inputs"),
    (["--model", "vit", "--norm", "batch"], "norm='batch' applies to mlp and lenet5 only"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, needle):
    rc = main(["compare", "--quick", "--quiet", "--output", str(tmp_path)] + argv)
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not any(tmp_path.rglob("curves.json"))


def test_norm_reaches_every_method_network_and_the_saved_settings():
    from bmrs_pyro.compare import CompareConfig
    from bmrs_pyro.compare.config import _builder
    from bmrs_pyro.data import load

    data = load("digits", seed=0)
    for model, expected in (("mlp", torch.nn.BatchNorm1d), ("lenet5", torch.nn.BatchNorm2d)):
        config = CompareConfig(model=model, methods="iap", norm="batch")
        assert config.to_dict()["norm"] == "batch"
        assert any(isinstance(m, expected) for m in _builder(config, data)().modules())
    plain = CompareConfig(model="mlp", methods="iap")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in _builder(plain, data)().modules())
