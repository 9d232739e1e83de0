"""Checkpoints of a fitted multiplicative-noise model: save, load, resume.

A checkpoint is one ``torch.save`` file holding

- ``model_state``: the model's ``state_dict`` (weights, BatchNorm statistics and every noise
  layer's ``mask`` buffer, so pruning decisions survive);
- ``guide_state``: the guide's ``state_dict`` (loc and log-scale of every noise site);
- ``param_store``: ``pyro.get_param_store().get_state()`` (bare ``pyro.param`` sites as well);
- ``optimizer_state``, ``epoch`` (epochs completed), ``history``, ``config`` and ``extra``
  (anything JSON- or torch-serialisable the caller wants back, e.g. a stage name);
- ``rng_state`` (format version 2): every random state at the end of that epoch -- torch (CPU
  and CUDA), NumPy, Python and the minibatch-order generator (:mod:`bmrs_pyro.rng`) -- so that a
  resumed run draws what the uninterrupted one would have drawn.

It is written atomically (a temporary file in the same folder, then :func:`os.replace`), so a
crash while saving leaves the previous checkpoint intact.

**Loading needs a guide that has run once.** An AutoGuide creates its parameters lazily on its
first call, so a freshly built guide has nothing to load into. Either run it on a batch first
(``guide(x)``) or pass ``example_input=x`` to :func:`load_checkpoint`, which does it for you.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import pyro
import torch
from pyro.distributions import constraints
from torch.distributions import transform_to

from .atomic_io import atomic_torch_save
from .infer import History

FORMAT = "bmrs-pyro-checkpoint"
#: Format version: 2 adds ``rng_state`` (every random state, for an exact resume); version 1
#: files still load (``rng_state`` None).
VERSION = 2

__all__ = ["FORMAT", "VERSION", "history_from_dict", "load_checkpoint", "save_checkpoint"]


def _history_dict(history: Any) -> Optional[dict]:
    if history is None:
        return None
    if isinstance(history, History):
        return history.to_dict()
    if isinstance(history, dict):
        return {k: list(history.get(k, [])) for k in ("elbo", "loss", "seconds", "events", "warm_start")}
    raise ValueError(f"history must be a bmrs_pyro.infer.History or a dict, got {type(history).__name__}")


def history_from_dict(data: Optional[dict]) -> History:
    """A :class:`~bmrs_pyro.infer.History` rebuilt from ``History.to_dict()`` output (empty if None)."""
    history = History()
    for key in ("elbo", "loss", "seconds", "events", "warm_start"):
        getattr(history, key).extend(list((data or {}).get(key, [])))
    return history


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An error message on one line (torch's state-dict errors span several), shortened."""
    text = "; ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _guide_ready(guide: Any) -> bool:
    # AutoGuides create parameters on their first call; an AutoGuideList is ready when its parts are.
    if hasattr(guide, "prototype_trace"):
        return guide.prototype_trace is not None
    return True


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    guide: torch.nn.Module,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    history: Any = None,
    config: Optional[dict] = None,
    epoch: Optional[int] = None,
    extra: Optional[dict] = None,
    rng_state: Optional[dict] = None,
) -> Path:
    """Write model, guide, Pyro param store, optimizer state and training progress to ``path``.

    Args:
        path: the file to write (its folder must exist); replaced atomically.
        model, guide: the Pyro model (an ``nn.Module``) and its guide, which must have run once.
        optimizer: its ``state_dict`` is saved (Adam moments, step counts) for resuming.
        history: a :class:`~bmrs_pyro.infer.History` (or its ``to_dict()``).
        config: the run's options (JSON-like).
        epoch: number of epochs completed.
        extra: anything else to restore with the checkpoint.
        rng_state: the random states to continue from (:func:`bmrs_pyro.rng.capture_rng`; ``fit``
            leaves them in ``history.rng_state`` after each epoch), for a bit-exact resume.

    Returns the path written.

    Raises:
        ValueError: the guide has not run yet (it would save no variational parameters), or a
        model/guide that is not an ``nn.Module``.
    """
    for name, obj in (("model", model), ("guide", guide)):
        if not isinstance(obj, torch.nn.Module):
            raise ValueError(f"{name} must be a torch.nn.Module, got {type(obj).__name__}")
    if not _guide_ready(guide):
        raise ValueError("the guide has not run yet, so it has no parameters to save: run it once (or fit) first")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        raise ValueError(f"epoch must be an int >= 0 (epochs completed), got {epoch!r}")

    store = pyro.get_param_store().get_state()
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_state": model.state_dict(),
        "guide_state": guide.state_dict(),
        "param_store": {
            "params": {k: v.detach().clone() for k, v in store["params"].items()},
            "constraints": dict(store["constraints"]),
        },
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "history": _history_dict(history),
        "config": dict(config) if config is not None else None,
        "extra": dict(extra) if extra is not None else None,
        "rng_state": rng_state,
    }
    return atomic_torch_save(payload, path)


def _restore_param_store(saved: dict) -> None:
    """Merge the saved param store into the live one without replacing live tensors.

    Entries that already exist (e.g. registered by the guide's PyroModule parameters) are copied
    in place: a PyroModule prefers the store's tensor over its own, so swapping in new tensor
    objects would silently detach the module's parameters from any optimizer built on them.
    """
    store = pyro.get_param_store()
    for name, unconstrained in saved.get("params", {}).items():
        constraint = saved.get("constraints", {}).get(name, constraints.real)
        if name in store:
            live = store._params[name]  # the unconstrained leaf tensor; no public accessor exists
            if live.shape != unconstrained.shape:
                raise ValueError(
                    f"param store entry {name!r} has shape {tuple(live.shape)} but the checkpoint holds "
                    f"{tuple(unconstrained.shape)}: the model was built with different options"
                )
            with torch.no_grad():
                live.copy_(unconstrained.to(live.device))
        else:
            with torch.no_grad():
                value = transform_to(constraint)(unconstrained)
            store.setdefault(name, value, constraint)


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    guide: torch.nn.Module,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    example_input: Optional[torch.Tensor] = None,
    map_location: str | torch.device = "cpu",
) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model`` and ``guide``.

    The model and guide must be built the same way as when saving. The guide must have run once
    (AutoGuides create their parameters lazily); pass ``example_input`` (a batch) to have this
    function run it. Parameters are restored in place, so an optimizer built on them stays valid;
    pass it as ``optimizer`` to restore its state too (it must have been built over the same
    parameters in the same order).

    Returns ``{"epoch", "history" (a History), "config", "extra", "optimizer_state", "rng_state"}``
    (``rng_state`` None for checkpoints written without one, e.g. by format version 1).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a bmrs-pyro checkpoint, a guide that has not run and no ``example_input``,
        or states that do not fit the given model/guide/optimizer.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass the checkpoint.pt written by save_checkpoint / `bmrs run`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{path} could not be read as a checkpoint (corrupt or truncated? {type(err).__name__}: "
                         f"{_one_line(err)}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bmrs-pyro checkpoint (no {FORMAT!r} marker)")
    version = payload.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{path} has an invalid checkpoint format version {version!r}")
    if version > VERSION:
        raise ValueError(f"{path} was written by a newer bmrs-pyro (format version {payload['version']}); upgrade")
    if not _guide_ready(guide):
        if example_input is None:
            raise ValueError(
                "the guide has not run yet, so it has no parameters to load into: pass example_input=<a batch> "
                "or call guide(x) once before load_checkpoint"
            )
        with torch.no_grad():
            guide(example_input)
    try:
        model.load_state_dict(payload["model_state"])
        guide.load_state_dict(payload["guide_state"])
    except RuntimeError as err:
        detail = _one_line(err).split(":; ", 1)[-1]  # drop torch's "Error(s) in loading state_dict for X:"
        raise ValueError(f"{path} does not fit this model/guide: it was saved from a different one ({detail}); "
                         "build the model with the options it was saved with") from None
    _restore_param_store(payload.get("param_store") or {})
    opt_state = payload.get("optimizer_state")
    if optimizer is not None:
        if opt_state is None:
            raise ValueError(f"{path} holds no optimizer state; build a fresh optimizer instead")
        try:
            optimizer.load_state_dict(opt_state)
        except ValueError as err:
            raise ValueError(f"the optimizer state does not fit this optimizer: {_one_line(err)}") from None
    return {
        "epoch": payload.get("epoch"),
        "history": history_from_dict(payload.get("history")),
        "config": payload.get("config"),
        "extra": payload.get("extra"),
        "optimizer_state": opt_state,
        "rng_state": payload.get("rng_state"),
    }
