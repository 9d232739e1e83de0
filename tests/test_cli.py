"""The ``bmrs`` command line, run in-process with tiny settings."""

from __future__ import annotations

import json
import math
import re

import arviz as az
import numpy as np
import pyro
import pytest
import torch
from scipy.stats import norm

import bmrs_pyro.checkpoint as checkpoint_module
from bmrs_pyro import atomic_io, run_config, run_summary, runs
from bmrs_pyro.cli import COMMANDS, main
from bmrs_pyro.data import load
from bmrs_pyro.infer import WARM_START_FRACTION
from bmrs_pyro.runs import RunConfig

# No warm start in the tiny runs, so their epochs are all SVI (test_warm_start_run covers it).
TINY = ["--hidden", "16", "--batch-size", "256", "--finetune-epochs", "1", "--warm-start-epochs", "0", "--quiet"]
METRIC_KEYS = {"accuracy_before", "accuracy_after", "nll_before", "nll_after", "structures", "layers",
               "parameters", "flops", "latency_ms", "elbo", "seconds", "method", "data", "model"}


@pytest.fixture(scope="module")
def digits_test():
    return load("digits", seed=0).test


def _e_theta(loc: np.ndarray, scale: np.ndarray, low: float = -20.0, high: float = 0.0) -> np.ndarray:
    """E[theta] of a truncated log-normal by the closed form of docs/design.md (scipy)."""
    a, b = (low - loc) / scale, (high - loc) / scale
    z = norm.cdf(b) - norm.cdf(a)
    return np.exp(loc + scale**2 / 2) * (norm.cdf(b - scale) - norm.cdf(a - scale)) / z


# ---------------------------------------------------------------------------- help


def test_help_lists_commands_and_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("run", "report"):
        assert name in out
    assert "examples:" in out and "bmrs run" in out


def test_run_help_shows_every_default(capsys):
    assert main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    d = RunConfig()
    for option, value in (("--epochs", d.epochs), ("--lr", d.lr), ("--batch-size", d.batch_size),
                          ("--kl-weight", d.kl_weight), ("--finetune-epochs", d.finetune_epochs),
                          ("--method", d.method), ("--data", d.data), ("--model", d.model), ("--seed", d.seed)):
        assert option in out
        assert f"(default: {value})" in out, option
    assert "(default: 100,100)" in out
    for option in ("--resume", "--no-report", "--quiet", "--device", "--output", "--name", "--bits",
                   "--fraction", "--prune-every", "--root", "--threads"):
        assert option in out
    assert "examples:" in out and "--resume runs/" in out


def test_report_help(capsys):
    assert main(["report", "--help"]) == 0
    out = capsys.readouterr().out
    assert "RUN_DIR" in out and "example:" in out and "(default: 110)" in out


def test_every_command_is_registered_once():
    names = [c.name for c in COMMANDS]
    assert names[:2] == ["run", "report"] and len(names) == len(set(names))


def test_default_name_and_resolution():
    cfg = RunConfig().resolved()
    assert re.fullmatch(r"digits-mlp-bmrs_n-\d{8}-\d{6}", cfg.name)
    assert cfg.prune_every == run_config.DEFAULT_PRUNE_EVERY
    ranked = RunConfig(method="l2", fraction=0.3, model="lenet5").resolved()
    assert ranked.prune_every == 0 and ranked.hidden is None


# ---------------------------------------------------------------------------- a whole run


def test_run_writes_the_run_folder(tmp_path, capsys, digits_test):
    out = tmp_path / "runs"
    code = main(["run", "--epochs", "2", *TINY, "--method", "e_theta", "--fraction", "0.5",
                 "--output", str(out), "--name", "t1", "--seed", "3"])
    printed = capsys.readouterr().out
    assert code == 0
    run = out / "t1"
    for name in ("config.json", "metrics.json", "checkpoint.pt", "final.pt", "compacted.pt",
                 "compacted_state.pt", "inference_data.nc", "report.html"):
        assert (run / name).is_file(), name
    assert {p.name for p in (run / "figures").glob("*.png")} >= {"kept_width.png", "elbo.png", "posterior_forest.png"}
    assert not list(run.glob(".*tmp"))

    config = json.loads((run / "config.json").read_text())
    assert {f for f in RunConfig.__dataclass_fields__} <= set(config)
    assert config["prune_every"] == 0 and config["hidden"] == [16] and config["fraction"] == 0.5
    assert config["epochs"] == 2 and config["seed"] == 3 and config["name"] == "t1"

    metrics = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert (metrics["method"], metrics["data"], metrics["model"]) == ("e_theta", "digits", "mlp")
    assert len(metrics["elbo"]) == 2 + 1  # training + fine-tuning epochs

    # e_theta with fraction 0.5 removes floor(0.5 * 16) = 8 of the 16 hidden units.
    kept = 8
    assert metrics["structures"] == {"total": 16, "kept": kept, "removed_pct": 50.0}
    assert metrics["layers"] == [{"site": "net.3.theta", "kept": kept, "total": 16}]
    # Parameters and FLOPs of a 64-k-10 network by hand (a Linear costs 2 * in * out FLOPs).
    assert metrics["parameters"]["before"] == 64 * 16 + 16 + 16 * 10 + 10
    assert metrics["parameters"]["after"] == 64 * kept + kept + kept * 10 + 10
    assert metrics["flops"]["before"] == 2 * (64 * 16 + 16 * 10)
    assert metrics["flops"]["after"] == 2 * (64 * kept + kept * 10)
    assert math.isclose(metrics["parameters"]["removed_pct"], 100 * (1 - (75 * kept + 10) / 1210))
    assert metrics["latency_ms"]["before"] > 0 and metrics["latency_ms"]["after"] > 0

    x, y = digits_test
    compacted = torch.load(run / "compacted.pt", weights_only=False)
    with torch.no_grad():
        acc_compacted = (compacted(x).argmax(-1) == y).double().mean().item()
    assert metrics["accuracy_after"] == pytest.approx(acc_compacted, abs=1e-12)

    # "Before" = the trained network (checkpoint.pt, end of training) with every mask 1; "after" =
    # the pruned, fine-tuned one (final.pt); both by a hand-written mean-mode forward pass.
    def accuracy_and_nll(ckpt, use_mask):
        state, guide_state = ckpt["model_state"], ckpt["guide_state"]
        loc = guide_state["locs.net.3.theta_unconstrained"].double().numpy()
        scale = np.exp(np.clip(guide_state["log_scales.net.3.theta_unconstrained"].double().numpy(), -20, 5))
        factor = torch.tensor(_e_theta(loc, scale))
        if use_mask:
            factor = factor * state["net.3.mask"].double()
        h = torch.tanh(x.flatten(1).double() @ state["net.1.weight"].double().T + state["net.1.bias"].double())
        logits = (h * factor) @ state["net.4.weight"].double().T + state["net.4.bias"].double()
        logp = torch.log_softmax(logits, -1)
        return (logits.argmax(-1) == y).double().mean().item(), -logp.gather(1, y[:, None]).mean().item()

    trained = torch.load(run / "checkpoint.pt", weights_only=False)
    final = torch.load(run / "final.pt", weights_only=False)
    assert trained["epoch"] == 2 and final["epoch"] == 3
    assert int(final["model_state"]["net.3.mask"].sum()) == kept
    saved = run_summary.reduction_from_dict(final["extra"]["reduction"])
    assert saved.method == "e_theta" and saved.kept_per_layer == {"net.3.theta": (kept, 16)}
    assert torch.equal(saved.keep["net.3.theta"], final["model_state"]["net.3.mask"].bool())
    acc_b, nll_b = accuracy_and_nll(trained, use_mask=False)
    acc_a, nll_a = accuracy_and_nll(final, use_mask=True)
    assert metrics["accuracy_before"] == pytest.approx(acc_b, abs=1e-12)
    assert metrics["nll_before"] == pytest.approx(nll_b, rel=1e-4)
    assert metrics["accuracy_after"] == pytest.approx(acc_a, abs=1e-12)
    assert metrics["nll_after"] == pytest.approx(nll_a, rel=1e-4)
    assert metrics["nll_before"] != metrics["nll_after"]

    idata = az.from_netcdf(run / "inference_data.nc")
    assert "posterior" in idata.groups() and idata.posterior["net.3.theta"].shape[-1] == 16

    # The printed table shows the same numbers.
    assert "accuracy (test)" in printed and f"{100 * metrics['accuracy_after']:.2f} %" in printed
    assert re.search(r"structures\s+16\s+8\s+50\.0 %", printed)
    assert re.search(r"parameters\s+1,210\s+" + f"{75 * kept + 10:,}", printed)
    assert re.search(r"net\.3\.theta\s+8\s+16\s+50\.0 %", printed)

    # bmrs report rebuilds the page and the figures.
    (run / "report.html").unlink()
    for png in (run / "figures").glob("*.png"):
        png.unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "figures" / "kept_width.png").is_file()
    assert str(run / "report.html") in capsys.readouterr().out

    # A second run under the same name would overwrite it: refused.
    assert main(["run", "--epochs", "1", *TINY, "--output", str(out), "--name", "t1"]) == 2
    assert "already holds a run" in capsys.readouterr().err


# ---------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    run = out / "r"
    real_save = checkpoint_module.save_checkpoint

    def save_then_crash(path, *args, epoch=None, **kwargs):
        result = real_save(path, *args, epoch=epoch, **kwargs)
        if epoch == 2:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_crash)
    args = ["run", "--epochs", "4", *TINY, "--prune-every", "1", "--no-report", "--output", str(out), "--name", "r"]
    assert main(args) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert not (run / "metrics.json").exists()
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 2
    steps_per_epoch = math.ceil(1150 / 256)
    saved_opt = saved["optimizer_state"]["state"]
    assert all(float(s["step"]) == 2 * steps_per_epoch for s in saved_opt.values())

    calls = []
    real_fit = runs.fit

    def spy_fit(model, guide, data, **kwargs):
        opt = kwargs["optimizer"]
        first = opt.state[opt.param_groups[0]["params"][0]]
        calls.append({"start_epoch": kwargs["start_epoch"], "epochs": kwargs["epochs"],
                      "prune_every": kwargs.get("prune_every"), "step": float(first["step"]),
                      "exp_avg": first["exp_avg"].clone(), "history_len": len(kwargs["history"].elbo)})
        return real_fit(model, guide, data, **kwargs)

    monkeypatch.setattr(runs, "fit", spy_fit)
    pyro.clear_param_store()
    assert main(["run", "--resume", str(run), "--epochs", "5", "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    training, finetuning = calls[0], calls[-1]
    assert training["start_epoch"] == 2 and training["epochs"] == 3 and training["prune_every"] == 1
    assert training["step"] == 2 * steps_per_epoch and training["history_len"] == 2
    assert torch.equal(training["exp_avg"], saved_opt[0]["exp_avg"])
    assert finetuning["start_epoch"] == 5 and finetuning["epochs"] == 1
    assert finetuning["step"] == 5 * steps_per_epoch

    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["elbo"]) == 5 + 1
    assert metrics["elbo"][:2] == pytest.approx(saved["history"]["elbo"])
    assert metrics["epochs"]["resumed_from"] == 2
    assert [e["epoch"] for e in metrics["pruning_events"] if not e.get("final")] == [0, 1, 2, 3, 4]
    assert metrics["pruning_events"][-1] == {**metrics["pruning_events"][-1], "epoch": 4, "final": True}
    assert json.loads((run / "config.json").read_text())["epochs"] == 5
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 5

    # Settings that would make a different run are refused.
    assert main(["run", "--resume", str(run), "--lr", "0.5", "--quiet"]) == 2
    assert "--lr" in capsys.readouterr().err
    assert main(["run", "--resume", str(run), "--epochs", "3", "--quiet"]) == 2
    assert "at least 5" in capsys.readouterr().err

    # A crash while writing metrics.json leaves the previous file whole.
    old = (run / "metrics.json").read_bytes()
    real_dump = json.dump

    def dump_metrics_fails(obj, fp, **kwargs):
        if isinstance(obj, dict) and "accuracy_after" in obj:
            fp.write('{"accuracy_before": ')
            raise OSError(28, "No space left on device")
        return real_dump(obj, fp, **kwargs)

    monkeypatch.setattr(atomic_io.json, "dump", dump_metrics_fails)
    pyro.clear_param_store()
    assert main(["run", "--resume", str(run), "--quiet", "--no-report"]) == 1
    assert "No space left" in capsys.readouterr().err
    assert (run / "metrics.json").read_bytes() == old
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_resume_needs_a_run_folder_with_a_checkpoint(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["run", "--resume", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err
    folder = tmp_path / "nockpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(RunConfig(name="nockpt").to_dict()))
    assert main(["run", "--resume", str(folder)]) == 2
    assert "checkpoint.pt" in capsys.readouterr().err


# ---------------------------------------------------------------------------- bad input


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a run gets as far as building the experiment."""

    def forbidden(config):
        raise AssertionError("training started despite bad input")

    monkeypatch.setattr(runs, "build_experiment", forbidden)


@pytest.mark.parametrize("option, value, listed", [
    ("--model", "alexnet", ["mlp", "lenet5", "resnet", "vit"]),
    ("--data", "imagenet", ["digits", "mnist1d", "teacher_student", "cifar10"]),
    ("--method", "magic", ["bmrs_n", "bmrs_u", "snr", "l2"]),
])
def test_unknown_names_list_the_valid_ones(option, value, listed, capsys, tmp_path, no_training):
    assert main(["run", option, value, "--output", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert value in captured.err and all(name in captured.err for name in listed)
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--epochs", "-3"], "--epochs: must be a positive integer"),
    (["--epochs", "2.5"], "--epochs: must be a positive integer"),
    (["--lr", "0"], "--lr: must be a positive number"),
    (["--lr", "-0.1"], "--lr: must be a positive number"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--guide-lr", "0"], "--guide-lr: must be a positive number"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--kl-weight", "-1"], "--kl-weight: must be a number >= 0"),
    (["--hidden", "100,x"], "comma-separated positive integers"),
    (["--hidden", "100,,50"], "comma-separated positive integers"),
    (["--hidden", "0"], "every hidden width must be >= 1"),
    (["--hidden", ""], "comma-separated positive integers"),
    (["--fraction", "1.5"], "--fraction: must be in [0, 1]"),
    (["--prune-every", "-1"], "--prune-every: must be an integer >= 0"),
    (["--method", "l2"], "pass --fraction"),
    (["--method", "l2", "--fraction", "0.3", "--prune-every", "2"], "--prune-every 0"),
    (["--model", "lenet5", "--hidden", "10"], "--hidden applies to --model mlp only"),
    (["--device", "tpu"], "device must be 'cpu' or 'cuda'"),
    (["--threads", "0"], "--threads: must be a positive integer"),
    (["--name", ".."], "plain folder name"),
    (["--margin", "-1"], "--margin: must be a number >= 0"),
    (["--margin", "inf"], "--margin: must be a finite number"),
    (["--method", "snr", "--margin", "1"], "--margin applies to bmrs_n and bmrs_u only"),
    (["--reference-code", "--margin", "2"], "cannot be combined with margin"),
    (["--method", "bmrs_u", "--reference-code"], "--reference-code applies to bmrs_n only"),
    (["--method", "bmrs_u", "--bits", "0"], "bits must be >= 1"),
    (["--method", "none", "--fraction", "0.5"], "--method none removes nothing"),
    (["--prune-start", "0"], "--prune-start: must be a positive integer"),
    (["--model", "vit", "--norm", "batch"], "norm='batch' applies to mlp and lenet5 only"),
])
def test_bad_values_are_refused_before_training(args, message, capsys, tmp_path, no_training):
    assert main(["run", *args, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cuda_without_a_gpu_is_a_clear_error(capsys, tmp_path, monkeypatch, no_training):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["run", "--device", "cuda", "--output", str(tmp_path / "o")]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err


def test_output_under_a_file_is_reported_before_training(tmp_path, capsys, no_training):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["run", "--output", str(blocker / "runs"), "--name", "t"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and str(blocker) in err


def test_unwritable_output_is_reported_before_training(tmp_path, capsys, monkeypatch, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:  # root ignores permission bits; then make the write fail the way a read-only disk does
            probe.mkdir()
            probe.rmdir()

            def read_only(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(run_config.tempfile, "mkstemp", read_only)
        except PermissionError:
            pass
        assert main(["run", "--output", str(locked), "--name", "t"]) == 2
        err = capsys.readouterr().err
        assert "cannot write the run folder" in err and "Permission denied" in err
    finally:
        locked.chmod(0o700)


def test_report_errors_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "config.json" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "metrics.json").write_text("{half")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "Traceback" not in err


def test_run_config_validation_messages():
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        RunConfig(kl_weight=-0.5).resolved().validate()
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        RunConfig(epochs=0).resolved().validate()
    with pytest.raises(ValueError, match="unknown model 'x'; choose one of mlp"):
        RunConfig(model="x").resolved().validate()
    with pytest.raises(ValueError, match="unknown config keys"):
        RunConfig.from_dict({"epochs": 3, "colour": "red"})
    cfg = RunConfig(hidden=(5, 6)).resolved()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.fixture
def fitted_reduction():
    """A real bmrs_n reduction of a small MLP whose posteriors are partly near the prior (tie band),
    partly sharp near theta = 1 (kept) and partly piled at the lower bound (removed)."""
    from bmrs_pyro.guides import AutoTruncatedLogNormal
    from bmrs_pyro.models import mlp
    from bmrs_pyro.pruner import reduce

    pyro.clear_param_store()
    model = mlp(4, 3, hidden=(6, 5))
    guide = AutoTruncatedLogNormal(model)
    guide(torch.randn(2, 4))
    for i, site in enumerate(guide.site_names):
        loc, log_scale = guide.locs, guide.log_scales
        *path, leaf = site.split(".")
        owner_l, owner_s = loc, log_scale
        for part in path:
            owner_l, owner_s = getattr(owner_l, part), getattr(owner_s, part)
        n = getattr(owner_l, leaf + "_unconstrained").numel()
        with torch.no_grad():
            getattr(owner_l, leaf + "_unconstrained").copy_(torch.tensor([-10.0, -0.5, -20.0, -9.0, -0.1, -11.0][:n]))
            getattr(owner_s, leaf + "_unconstrained").copy_(torch.tensor([5.0, -4.0, -1.0, 4.0, -5.0, 3.0][:n]))
    return reduce(model, guide, "bmrs_n")


def test_decision_and_tie_band_are_recorded_and_printed(fitted_reduction):
    from bmrs_pyro.analysis import SavedReduction

    reduction = fitted_reduction
    decision = run_summary.decision_summary(reduction)
    df = torch.cat([reduction.scores[s] for s in reduction.keep])
    keep = torch.cat([reduction.keep[s] for s in reduction.keep])
    band = (df >= -1.0) & (df < 0)
    assert decision["margin"] == 1.0 and decision["rule"] == reduction.rule
    assert decision["tie_band"] == {"band": [-1.0, 0.0], "count": int(band.sum()), "removed": int((band & ~keep).sum())}
    assert "margin" not in run_summary.decision_summary(SavedReduction("snr", reduction.scores, reduction.keep))
    metrics = {"data": "digits", "model": "mlp", "method": "bmrs_n", "accuracy_before": 0.9, "accuracy_after": 0.8,
               "nll_before": 0.3, "nll_after": 0.4, "decision": decision,
               "parameters": {"before": 10, "after": 5, "removed_pct": 50.0},
               "flops": {"before": 20, "after": 10, "removed_pct": 50.0},
               "latency_ms": {"before": 1.0, "after": 0.5, "batch": 4}, **run_summary.structure_summary(reduction)}
    table = run_summary.format_summary(metrics)
    assert "rule: prune where dF >= -1 nat" in table
    assert f"tie band: {int(band.sum())} structures have -1 <= dF < 0" in table


def test_warm_start_run_and_resume_inside_it(tmp_path, capsys, monkeypatch):
    """--warm-start-epochs: deterministic epochs first (no pruning in them), also across a resume."""
    out = tmp_path / "runs"
    run = out / "w"
    real_save = checkpoint_module.save_checkpoint

    def save_then_crash(path, *args, epoch=None, **kwargs):
        result = real_save(path, *args, epoch=epoch, **kwargs)
        if epoch == 1:  # inside the warm start
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_crash)
    tiny = [a for a in TINY if a not in ("--warm-start-epochs", "0")]
    args = ["run", "--epochs", "6", *tiny, "--warm-start-epochs", "3", "--prune-every", "1", "--no-report",
            "--output", str(out), "--name", "w"]
    assert main(args) == 130
    monkeypatch.undo()
    capsys.readouterr()
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    assert saved["epoch"] == 1 and len(saved["history"]["warm_start"]) == 1 and saved["history"]["elbo"] == []
    pyro.clear_param_store()
    assert main(["run", "--resume", str(run), "--quiet", "--no-report"]) == 0
    assert "deterministic" not in capsys.readouterr().err  # --quiet
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["warm_start"]) == 3
    assert len(metrics["elbo"]) == 3 + 1  # SVI epochs + fine-tuning
    assert [e["epoch"] for e in metrics["pruning_events"] if not e.get("final")] == [3, 4, 5]
    assert json.loads((run / "config.json").read_text())["warm_start_epochs"] == 3


@pytest.mark.parametrize("epochs,warm", [(2, 3), (5, -1)])
def test_warm_start_epochs_bad(epochs, warm):
    with pytest.raises(ValueError, match="warm_start_epochs"):
        RunConfig(epochs=epochs, warm_start_epochs=warm).resolved().validate()


def test_warm_start_default_is_a_quarter_of_the_epochs():
    assert RunConfig(epochs=100).resolved().warm_start_epochs == 25
    assert RunConfig(epochs=1).resolved().warm_start_epochs == 0  # at least one SVI epoch
    assert RunConfig(epochs=7, warm_start_epochs=0).resolved().warm_start_epochs == 0


@pytest.mark.slow
def test_default_run(tmp_path, capsys):
    """``bmrs run`` with every default (measured at about 20 s on 2 shared cores), warm start included."""
    threads = torch.get_num_threads()
    assert main(["run", "--output", str(tmp_path), "--name", "default", "--quiet"]) == 0
    assert torch.get_num_threads() == threads  # --threads is restored after the run
    run = tmp_path / "default"
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == RunConfig().epochs and config["prune_every"] == run_config.DEFAULT_PRUNE_EVERY
    assert config["kl_weight"] == 1.0 and config["hidden"] == [100, 100] and config["activation"] == "tanh"
    assert metrics["accuracy_after"] >= 0.95
    warm = config["warm_start_epochs"]
    assert warm == round(RunConfig().epochs * WARM_START_FRACTION) and len(metrics["warm_start"]) == warm
    continuous = [e["epoch"] for e in metrics["pruning_events"] if not e.get("final")]
    start = config["prune_start"]
    # the pruning warm-up: a quarter of the SVI epochs after the deterministic warm start
    assert start == warm + math.ceil(0.25 * (RunConfig().epochs - warm))
    assert continuous == list(range(start - 1, RunConfig().epochs, run_config.DEFAULT_PRUNE_EVERY))
    assert metrics["pruning_events"][-1]["final"] and metrics["decision"]["margin"] == 1.0
    assert (run / "report.html").is_file()
    assert "accuracy (test)" in capsys.readouterr().out


def test_guide_lr_and_reference_code_reach_the_optimizer_and_the_criterion():
    cfg = RunConfig(guide_lr=0.07, reference_code=True, epochs=1, hidden=(4,)).resolved()
    exp = runs.build_experiment(cfg)
    assert [g["lr"] for g in exp.optimizer.param_groups] == [cfg.lr, 0.07]
    assert {id(p) for p in exp.optimizer.param_groups[1]["params"]} == {id(p) for p in exp.guide.parameters()}
    assert cfg.method_options == {"reference_code": True}
    assert cfg.margin == pytest.approx(0.5 * math.log(2 * math.pi))  # the published decisions
    assert RunConfig(method="bmrs_u").resolved().method_options == {"bits": 8, "margin": 1.0}
    assert RunConfig().resolved().method_options == {"margin": 1.0}
    assert RunConfig(margin=0.0).resolved().method_options == {"margin": 0.0}
    assert RunConfig(method="snr").resolved().margin is None
    none = RunConfig(method="none").resolved()
    assert none.prune_every == 0 and none.method_options == {}
    # after the warm start (a quarter of 40), a pruning warm-up of a quarter of the 30 SVI epochs
    assert RunConfig(epochs=40).resolved().prune_start == 18
    with pytest.raises(ValueError, match="guide_lr"):
        RunConfig(guide_lr=-1.0).validate()
