"""Faults and bad inputs of docs/reliability.md: each test names what goes wrong and checks the behaviour.

Permission tests simulate the refusal (the tests may run as root, who ignores permission bits):
``tempfile.mkstemp`` in the protected folder raises ``PermissionError`` as a read-only folder would.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import pytest
import torch

import bmrs_pyro.checkpoint as checkpoint_module
from bmrs_pyro import AutoTruncatedLogNormal, evaluate, fit, reduce, runs
from bmrs_pyro.checks import InputError, check_data
from bmrs_pyro.cli import build_parser, main
from bmrs_pyro.infer import TrainingDivergedError
from bmrs_pyro.models import build

TINY = ["--hidden", "8", "--batch-size", "256", "--epochs", "2", "--finetune-epochs", "1", "--quiet", "--no-report"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")


def _one_line(message: str) -> None:
    assert "\n" not in message.strip() and "tensor(" not in message, message


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a run gets as far as loading data and building the experiment."""

    def forbidden(config):
        raise AssertionError("data were loaded despite bad options")

    monkeypatch.setattr(runs, "build_experiment", forbidden)


@pytest.fixture
def small():
    pyro.clear_param_store()
    model = build("mlp", (8,), 2, hidden=(6,), activation="tanh")
    guide = AutoTruncatedLogNormal(model)
    x, y = torch.randn(40, 8), torch.randint(0, 2, (40,))
    return model, guide, x, y


def _finished_run(tmp_path: Path, name: str = "r", extra=()) -> Path:
    pyro.clear_param_store()
    assert main(["run", *TINY, *extra, "--output", str(tmp_path), "--name", name]) == 0
    return tmp_path / name


# ------------------------------------------------------------------------------------ bad data


@pytest.mark.parametrize("fault, needle", [
    ("nan", r"X has 2 non-finite value\(s\) \(NaN or inf\), the first \(nan\) at row 3, column 5"),
    ("inf", r"X has 1 non-finite value\(s\) \(NaN or inf\), the first \(inf\) at row 7, column 1"),
    ("labels", r"labels must be in 0\.\.1 for a model with 2 outputs; y holds -1, 5"),
    ("width", r"examples of shape \(7,\) do not fit the model: its first layer net\.\d expects 8 features"),
    ("empty", r"is empty \(0 examples\)"),
    ("lengths", r"X has 40 rows but y has 39"),
    ("fractional", r"a classifier needs integer labels, y holds 0\.5"),
])
@pytest.mark.parametrize("entry", ["fit", "evaluate", "reduce"])
def test_bad_data_is_refused_before_the_first_step(small, fault, needle, entry):
    model, guide, x, y = small
    if fault == "nan":
        x[3, 5] = x[9, 0] = float("nan")
    elif fault == "inf":
        x[7, 1] = float("inf")
    elif fault == "labels":
        y[0], y[1] = 5, -1
    elif fault == "width":
        x = torch.randn(40, 7)
    elif fault == "empty":
        x, y = x[:0], y[:0]
    elif fault == "lengths":
        y = y[:39]
    elif fault == "fractional":
        y = y.float() + 0.5
    if entry != "fit":
        fit(model, guide, (torch.randn(40, 8), torch.randint(0, 2, (40,))), epochs=1, progress=False)
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    with pytest.raises(InputError, match=needle) as info:
        if entry == "fit":
            fit(model, guide, (x, y), epochs=1, progress=False)
        elif entry == "evaluate":
            evaluate(model, guide, (x, y))
        else:
            reduce(model, guide, "activation", fraction=0.5, data=(x, y))
    _one_line(str(info.value))
    assert isinstance(info.value, ValueError)
    if entry == "fit":
        assert guide.prototype_trace is None  # refused before the guide ever ran
    else:
        assert all(torch.equal(before[k], v) for k, v in guide.state_dict().items())


def test_the_check_leaves_random_state_and_batchnorm_alone():
    model = build("lenet5", (1, 8, 8), 10)
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    data = (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    state = torch.get_rng_state()
    check_data(data, model)
    assert torch.equal(state, torch.get_rng_state()) and model.training
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("where", ["guide", "model"])
def test_nan_appearing_mid_training_names_the_step_in_one_line(small, where):
    model, guide, x, y = small

    def poison(epoch, history, model_, guide_):
        if epoch == 1:
            with torch.no_grad():
                target = next(guide_.parameters()) if where == "guide" else model_.net[1].weight
                target.fill_(float("nan"))

    with pytest.raises(TrainingDivergedError, match=r"^step \d+") as info:
        fit(model, guide, (x, y), epochs=4, batch_size=20, callbacks=(poison,), progress=False)
    _one_line(str(info.value))
    step = int(str(info.value).split()[1].rstrip(":"))
    assert step == 2 * 2  # two epochs of two steps finished before the poisoned one


def _digits_with(monkeypatch, change):
    import bmrs_pyro.data as data_module

    real = data_module.load

    def load(name, **kwargs):
        splits = real(name, **kwargs)
        x, y = splits.train
        splits.train = change(x.clone(), y.clone())
        return splits

    monkeypatch.setattr(data_module, "load", load)


@pytest.mark.parametrize("change, needle", [
    (lambda x, y: (x.index_fill_(0, torch.tensor([4]), float("nan")), y), "non-finite value(s)"),
    (lambda x, y: (x, y.index_fill_(0, torch.tensor([0]), 12)), "labels must be in 0..9"),
])
def test_bmrs_run_with_bad_data_exits_2_and_leaves_no_folder(tmp_path, capsys, monkeypatch, change, needle):
    _digits_with(monkeypatch, change)
    assert main(["run", *TINY, "--output", str(tmp_path / "o"), "--name", "bad"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "digits train split" in err and "Traceback" not in err
    _one_line(err)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------- late checks, folders


def test_bits_0_is_refused_before_data_or_folder(tmp_path, capsys, no_training):
    assert main(["run", "--method", "bmrs_u", "--bits", "0", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bits must be >= 1 and <= 28" in err and "bmrs_u_score" not in err
    assert not (tmp_path / "o").exists()


def test_failed_data_load_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", "--data", "mnist", "--root", str(tmp_path / "nowhere"), *TINY, "--output", str(out)]) == 2
    assert "mnist" in capsys.readouterr().err.lower()
    assert not out.exists()


def test_disk_full_before_training_leaves_no_folder(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the first write is config.json
    assert main(["run", *TINY, "--output", str(tmp_path / "o"), "--name", "x"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "config.json" in err
    assert not (tmp_path / "o" / "x").exists()


def _deny(monkeypatch, folder: Path) -> None:
    """mkstemp in ``folder`` fails as in a read-only folder."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_read_only_run_folder_report_says_permission_denied(tmp_path, capsys, monkeypatch):
    run = _finished_run(tmp_path)
    _deny(monkeypatch, run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and str(run) in err and "not a valid run folder" not in err
    _one_line(err)


def test_resume_with_read_only_figures_is_refused_before_training(tmp_path, capsys, monkeypatch):
    run = _finished_run(tmp_path)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, report=True)))  # a run that builds its report
    (run / "figures").mkdir()
    _deny(monkeypatch, run / "figures")
    calls = []
    monkeypatch.setattr(runs, "train", lambda *a, **k: calls.append(1))
    assert main(["run", "--resume", str(run), "--epochs", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and str(run / "figures") in err and not calls
    assert "[Errno 13]" not in err


def test_folders_that_are_not_runs_name_the_missing_file(tmp_path, capsys):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(runs.RunConfig(name="half").to_dict()))
    assert main(["report", str(folder)]) == 2
    assert "metrics.json missing" in capsys.readouterr().err
    assert main(["run", "--resume", str(folder)]) == 2
    assert "has no checkpoint.pt" in capsys.readouterr().err
    (folder / "config.json").unlink()
    assert main(["run", "--resume", str(folder)]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_config_records_a_command_that_runs_as_written(tmp_path):
    run = _finished_run(tmp_path)
    command = json.loads((run / "config.json").read_text())["command"]
    assert command[:2] == ["bmrs", "run"] and "--name" in command
    args = build_parser().parse_args(command[1:])
    assert args.command == "run" and args.hidden == (8,) and args.epochs == 2
    # Resumed: the recorded command is the resume command, again with its subcommand.
    pyro.clear_param_store()
    assert main(["run", "--resume", str(run), "--epochs", "3", "--quiet", "--no-report"]) == 0
    command = json.loads((run / "config.json").read_text())["command"]
    assert command[:3] == ["bmrs", "run", "--resume"]


# --------------------------------------------------------------------------------- checkpoints


def _checkpoint_fault(run: Path, fault: str) -> None:
    ckpt = run / "checkpoint.pt"
    if fault == "corrupt":
        ckpt.write_bytes(os.urandom(4096))
    elif fault == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif fault == "version":
        payload = torch.load(ckpt, weights_only=False)
        payload["version"] = 99
        torch.save(payload, ckpt)
    elif fault == "foreign":
        other = _finished_run(run.parent, "other", ["--hidden", "5"])
        ckpt.write_bytes((other / "checkpoint.pt").read_bytes())


@pytest.mark.parametrize("fault, needle", [
    ("corrupt", "could not be read as a checkpoint"),
    ("truncated", "could not be read as a checkpoint"),
    ("version", "newer bmrs-pyro (format version 99)"),
    ("foreign", "does not fit this model/guide"),
])
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, capsys, fault, needle):
    run = _finished_run(tmp_path)
    final = (run / "final.pt").read_bytes()
    _checkpoint_fault(run, fault)
    capsys.readouterr()
    pyro.clear_param_store()
    assert main(["run", "--resume", str(run), "--epochs", "3", "--quiet", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    _one_line(err)
    assert (run / "final.pt").read_bytes() == final  # nothing was overwritten
    from bmrs_pyro.runlock import lock_holder

    assert lock_holder(run) is None


def test_disk_full_during_training_keeps_the_last_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    real = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:  # config.json, checkpoint of epoch 1, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "o"
    assert main(["run", *TINY, "--epochs", "3", "--output", str(out), "--name", "full"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "checkpoint.pt" in err
    monkeypatch.undo()
    run = out / "full"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    pyro.clear_param_store()
    assert main(["run", "--resume", str(run), "--quiet", "--no-report"]) == 0
    assert json.loads((run / "metrics.json").read_text())["epochs"]["resumed_from"] == 1


# ---------------------------------------------------------------------------------- interrupts


_SLOW = """
import sys, time
import bmrs_pyro.runs as runs
real = runs._checkpoint_callback
def slow(exp, path):
    callback = real(exp, path)
    def wrapped(*args):
        out = callback(*args)
        time.sleep(0.3)
        return out
    return wrapped
runs._checkpoint_callback = slow
from bmrs_pyro.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigint_during_training_exits_130_and_resumes(tmp_path):
    run = tmp_path / "o" / "int"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW, "run", *TINY, "--epochs", "20", "--output",
                             str(tmp_path / "o"), "--name", "int"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "bmrs run --resume" in err and "Traceback" not in err
    from bmrs_pyro.runlock import lock_holder

    assert lock_holder(run) is None and not (run / "metrics.json").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    pyro.clear_param_store()
    assert main(["run", "--resume", str(run), "--epochs", "11", "--quiet", "--no-report"]) == 0  # >= its warm start (10)


def test_sigint_while_writing_the_report_keeps_the_previous_files(tmp_path, capsys, monkeypatch):
    run = _finished_run(tmp_path)
    assert main(["report", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in (run / "figures").iterdir()}
    page = (run / "report.html").read_bytes()
    import bmrs_pyro.analysis.report as report_module

    real = report_module.atomic_write_bytes
    calls = []

    def interrupted(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C between two figures
        return real(path, data)

    monkeypatch.setattr(report_module, "atomic_write_bytes", interrupted)
    capsys.readouterr()
    assert main(["report", str(run), "--dpi", "60"]) == 130
    assert "run `bmrs report` again" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in (run / "figures").iterdir()}
    assert set(after) == set(before)  # no temporary files left, none missing
    assert sum(after[k] != before[k] for k in before) == 1  # only the figure written before Ctrl-C changed
    assert (run / "report.html").read_bytes() == page
    from bmrs_pyro.runlock import lock_holder

    assert lock_holder(run) is None


# ------------------------------------------------------------------------------------ compare


COMPARE = ["compare", "--quick", "--data", "digits", "--model", "mlp", "--hidden", "12,8", "--methods", "bmrs_n,iap",
           "--seeds", "2", "--epochs", "1", "--quiet", "--name", "c"]


def _records(folder: Path) -> dict:
    saved = json.loads((folder / "curves.json").read_text())
    return {(r["method"], r["seed"]): {k: v for k, v in r.items() if k != "wall_time"} for r in saved["records"]}


@pytest.mark.slow
def test_interrupted_compare_resumes_the_finished_pairs(tmp_path, capsys, monkeypatch):
    import bmrs_pyro.compare.execution as compare_module

    assert main([*COMPARE, "--output", str(tmp_path / "whole")]) == 0
    whole = _records(tmp_path / "whole" / "c")

    real = compare_module._run_task
    ran = []

    def run_task(config, methods, seed):
        if len(ran) == 2:
            raise KeyboardInterrupt
        ran.append((methods, seed))
        return real(config, methods, seed)

    monkeypatch.setattr(compare_module, "_run_task", run_task)
    out = tmp_path / "cut"
    assert main([*COMPARE, "--output", str(out)]) == 130
    assert "--name c to continue" in capsys.readouterr().err
    folder = out / "c"
    assert not (folder / "curves.json").exists()
    assert len((folder / "partial.jsonl").read_text().splitlines()) == 1 + sum(len(m) for m, _ in ran)

    first = list(ran)
    ran.clear()
    assert main([*COMPARE, "--output", str(out)]) == 0
    assert not set(ran) & set(first) and len(first) + len(ran) == 4  # only the unfinished tasks ran again
    assert _records(folder) == whole
    assert not (folder / "partial.jsonl").exists()


def test_compare_partial_with_other_settings_is_refused(tmp_path, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "partial.jsonl").write_text(json.dumps({"settings": "something else"}) + "\n")
    assert main([*COMPARE, "--output", str(tmp_path)]) == 2
    assert "unfinished comparison with other settings" in capsys.readouterr().err


def test_image_shape_errors_say_expected_and_got():
    model = build("lenet5", (1, 8, 8), 10)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(InputError, match=r"shape \(3, 8, 8\) do not fit the model: its first layer net\.0 expects 1 "
                                         r"input channels") as info:
        check_data((torch.randn(4, 3, 8, 8), y), model)
    _one_line(str(info.value))
    # Right channels, wrong size: the first layer fits, so the message quotes torch's complaint only.
    with pytest.raises(InputError, match=r"shape \(1, 5, 5\) do not fit the model \(torch: mat1 and mat2") as info:
        check_data((torch.randn(4, 1, 5, 5), y), model)
    assert "expects" not in str(info.value)
