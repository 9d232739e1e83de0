"""Checkpoints restore a fitted model exactly, and every run file is written atomically."""

from __future__ import annotations

import json
import os

import pyro
import pytest
import torch

from bmrs_pyro import atomic_io, runs
from bmrs_pyro.checkpoint import load_checkpoint, save_checkpoint
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import History, fit
from bmrs_pyro.models import mlp
from bmrs_pyro.nn import noise_mode, noise_modules


def _fresh(hidden=(12, 8), seed=0):
    pyro.set_rng_seed(seed)
    model = mlp(64, 10, hidden=hidden)
    return model, AutoTruncatedLogNormal(model)


@pytest.fixture
def fitted(digits):
    """A model fitted for two epochs with part of one layer pruned by hand, and its optimizer."""
    (xtr, ytr), _ = digits
    model, guide = _fresh()
    history = fit(model, guide, (xtr[:300], ytr[:300]), epochs=2, batch_size=100, lr=0.01, progress=False)
    layer = next(iter(noise_modules(model).values()))
    with torch.no_grad():
        layer.mask[:5] = 0.0
    return model, guide, history


def _mean_logits(model, x):
    with noise_mode(model, "mean"), torch.no_grad():
        return model.logits(x)


def test_round_trip_restores_identical_predictions(fitted, digits, tmp_path):
    model, guide, history = fitted
    _, (xte, _) = digits
    expected = _mean_logits(model, xte)
    path = save_checkpoint(tmp_path / "c.pt", model, guide, optimizer=history.optimizer, history=history,
                           config={"lr": 0.01}, epoch=2, extra={"stage": "train"})

    pyro.clear_param_store()
    model2, guide2 = _fresh(seed=123)  # different initial weights
    guide2(xte[:2])
    assert not torch.allclose(_mean_logits(model2, xte), expected)  # the test can fail
    state = load_checkpoint(path, model2, guide2)
    assert torch.equal(_mean_logits(model2, xte), expected)
    for site, layer in noise_modules(model2).items():
        assert torch.equal(layer.mask, noise_modules(model)[site].mask)
        for a, b in zip(guide2.loc_scale(site), guide.loc_scale(site)):
            assert torch.equal(a, b)
    assert state["epoch"] == 2
    assert state["config"] == {"lr": 0.01}
    assert state["extra"] == {"stage": "train"}
    assert isinstance(state["history"], History)
    assert state["history"].elbo == history.elbo and state["history"].loss == history.loss


def test_load_runs_the_guide_on_example_input(fitted, digits, tmp_path):
    model, guide, history = fitted
    _, (xte, _) = digits
    path = save_checkpoint(tmp_path / "c.pt", model, guide)
    pyro.clear_param_store()
    model2, guide2 = _fresh(seed=5)
    with pytest.raises(ValueError, match="example_input"):
        load_checkpoint(path, model2, guide2)
    load_checkpoint(path, model2, guide2, example_input=xte[:3])
    assert torch.equal(_mean_logits(model2, xte), _mean_logits(model, xte))


def test_optimizer_state_is_restored_and_training_continues(fitted, digits, tmp_path):
    model, guide, history = fitted
    (xtr, ytr), _ = digits
    opt = history.optimizer
    path = save_checkpoint(tmp_path / "c.pt", model, guide, optimizer=opt, history=history, epoch=2)

    pyro.clear_param_store()
    model2, guide2 = _fresh(seed=9)
    guide2(xtr[:2])
    params2 = runs.trainable_parameters(model2, guide2)
    # fit's own Adam saw model then guide parameters, the order trainable_parameters gives.
    opt2 = torch.optim.Adam(params2, lr=0.01)
    load_checkpoint(path, model2, guide2, optimizer=opt2)
    saved = opt.state_dict()["state"]
    loaded = opt2.state_dict()["state"]
    assert sorted(saved) == sorted(loaded) and len(saved) == len(params2)
    for k in saved:
        assert float(saved[k]["step"]) == float(loaded[k]["step"]) == 6  # 2 epochs x 3 batches
        assert torch.equal(saved[k]["exp_avg"], loaded[k]["exp_avg"])
        assert torch.equal(saved[k]["exp_avg_sq"], loaded[k]["exp_avg_sq"])
    # The restored parameters are the ones the optimizer steps: one more step moves them.
    before = [p.detach().clone() for p in params2]
    fit(model2, guide2, (xtr[:300], ytr[:300]), epochs=1, batch_size=100, optimizer=opt2, start_epoch=2,
        progress=False)
    assert float(opt2.state_dict()["state"][0]["step"]) == 9
    assert any(not torch.equal(a, b) for a, b in zip(before, params2))


def test_bare_param_store_entries_round_trip(fitted, tmp_path):
    model, guide, _ = fitted
    pyro.param("extra_scale", torch.tensor([0.5, 2.0]), constraint=torch.distributions.constraints.positive)
    path = save_checkpoint(tmp_path / "c.pt", model, guide)
    pyro.clear_param_store()
    model2, guide2 = _fresh(seed=1)
    guide2(torch.zeros(2, 64))
    load_checkpoint(path, model2, guide2)
    assert torch.allclose(pyro.param("extra_scale"), torch.tensor([0.5, 2.0]))


def test_checkpoint_errors(fitted, tmp_path):
    model, guide, _ = fitted
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", model, guide)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(junk, model, guide)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ValueError, match="not a bmrs-pyro checkpoint"):
        load_checkpoint(other, model, guide)
    path = save_checkpoint(tmp_path / "c.pt", model, guide)
    pyro.clear_param_store()
    wider, wider_guide = _fresh(hidden=(20, 8))
    wider_guide(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(path, wider, wider_guide)
    unfitted_model, unfitted_guide = _fresh()
    with pytest.raises(ValueError, match="has not run"):
        save_checkpoint(tmp_path / "d.pt", unfitted_model, unfitted_guide)
    with pytest.raises(ValueError, match="epoch"):
        save_checkpoint(tmp_path / "d.pt", model, guide, epoch=-1)


# ---------------------------------------------------------------------------- atomic writes


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_json_dump_failing_midway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_io.atomic_write_json(path, {"accuracy_after": 0.5})
    old = path.read_bytes()

    def broken_dump(obj, fp, **kwargs):
        fp.write('{"accuracy_after": 0.9')  # half a document, then the crash
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(atomic_io.json, "dump", broken_dump)
    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_io.atomic_write_json(path, {"accuracy_after": 0.9})
    assert path.read_bytes() == old
    assert json.loads(old) == {"accuracy_after": 0.5}
    assert _leftovers(tmp_path) == []


def test_crash_while_writing_bytes_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_io.atomic_write_bytes(path, b"old content")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_io.atomic_write_bytes(path, b"new content that never lands")
    assert path.read_bytes() == b"old content"
    assert _leftovers(tmp_path) == []
    # A first write that fails leaves no file at all.
    with pytest.raises(OSError):
        atomic_io.atomic_write_bytes(tmp_path / "fresh.json", b"{}")
    assert not (tmp_path / "fresh.json").exists()


def test_checkpoint_save_is_atomic(fitted, tmp_path, monkeypatch):
    model, guide, _ = fitted
    path = save_checkpoint(tmp_path / "c.pt", model, guide, epoch=1)
    old = path.read_bytes()
    monkeypatch.setattr(atomic_io.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, guide, epoch=2)
    assert path.read_bytes() == old
    assert _leftovers(tmp_path) == []


def test_atomic_files_get_ordinary_permissions(tmp_path):
    path = atomic_io.atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_json_is_standard_even_with_nan(tmp_path):
    path = atomic_io.atomic_write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")],
                                                         "t": torch.tensor([1, 2])})
    assert json.loads(path.read_text()) == {"a": "nan", "b": [1.0, "inf"], "t": [1, 2]}
