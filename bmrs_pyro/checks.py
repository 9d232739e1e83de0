"""Input checks that run before the first training or evaluation step.

Bad data used to reach Pyro and come back as a distribution's support error with a tensor dump
(NaN features, labels out of range) or as torch's ``mat1 and mat2 shapes cannot be multiplied``.
:func:`check_data` finds those problems up front and raises an :class:`InputError` (a
``ValueError``) with one line that says what is wrong and where:

- ``X`` and ``y`` are tensors with the same, non-zero number of rows;
- every feature is finite (the count of NaN/inf values and the first one's index);
- the examples fit the model: one forward pass on two rows (sampling from the prior, Pyro's and
  torch's random state restored afterwards, BatchNorm statistics untouched) must succeed;
- for a classifier (an observation site ``obs`` with logits), labels are integers in
  ``0 .. C-1`` where ``C`` is the model's output width (the offending values are listed).

:func:`fit`, :func:`evaluate`, :func:`reduce` (with ``data``) and ``bmrs run`` call it. A
``DataLoader`` is checked when its dataset is a ``TensorDataset`` of ``(X, y)``; other loaders
are passed through unchecked.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import Any, Iterator, Optional

import numpy as np
import pyro.poutine as poutine
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["InputError", "check_data", "model_output_width", "is_number", "check_int", "positive_int", "nonneg_int",
           "positive_number", "arg_int_at_least", "arg_positive_int", "arg_nonneg_int", "arg_float",
           "arg_positive_float", "arg_nonneg_float", "arg_fraction"]


class InputError(ValueError):
    """Data that cannot be used as given (shape, values or labels); the message says what to fix."""


# ------------------------------------------------------------------ scalar options (one place)


def is_number(value: Any) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    """``value`` as an ``int`` (numpy integers accepted) if it is ``>= minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is an integer ``>= 1``, else ValueError("<name> must be a positive integer ...")."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def nonneg_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is an integer ``>= 0`` (ValueError otherwise)."""
    return check_int(name, value, minimum=0)


def positive_number(name: str, value: Any) -> float:
    """``value`` as a ``float`` if it is a finite number ``> 0`` (ValueError otherwise)."""
    if not (is_number(value) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------ command-line value parsers (argparse types)


def arg_int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, refused with "must be <what>, got ..."."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


arg_positive_int = arg_int_at_least(1, "a positive integer")
arg_nonneg_int = arg_int_at_least(0, "an integer >= 0")


def arg_float(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def arg_positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = arg_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def arg_nonneg_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = arg_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def arg_fraction(text: str) -> float:
    """An argparse type: a number in [0, 1] (a share of structures to remove)."""
    value = arg_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (the share of structures to remove), got {text!r}")
    return value


def _fmt_index(flat: int, shape: tuple) -> str:
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    idx = list(reversed(idx))
    if len(idx) == 2:
        return f"row {idx[0]}, column {idx[1]}"
    return f"row {idx[0]}" + (f", position {tuple(idx[1:])}" if len(idx) > 1 else "")


def _shown(values: list, limit: int = 8) -> str:
    text = ", ".join(str(v) for v in values[:limit])
    return text + (f" (and {len(values) - limit} more)" if len(values) > limit else "")


def check_features(x: torch.Tensor, name: str = "data") -> None:
    """Raise :class:`InputError` if ``x`` is empty or holds NaN/inf (count and first index)."""
    if not torch.is_tensor(x):
        raise InputError(f"{name}: X must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise InputError(f"{name} is empty (0 examples); pass at least one example")
    if not (x.is_floating_point() or x.is_complex()):
        return
    if bool(torch.isfinite(x.sum())):  # fast path: a sum is finite only if every term is
        return
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    if count:
        first = int(torch.nonzero(bad.flatten(), as_tuple=False)[0, 0])
        value = x.flatten()[first].item()
        raise InputError(
            f"{name}: X has {count} non-finite value(s) (NaN or inf), the first ({value}) at "
            f"{_fmt_index(first, tuple(x.shape))}; remove or impute them first"
        )


def check_pair(data: Any, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` as tensors with matching, non-zero lengths (else :class:`InputError`)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InputError(f"{name} must be a tuple (X, y) of tensors or a DataLoader, got {type(data).__name__}")
    x, y = data
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise InputError(f"{name} must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
    if x.dim() == 0 or y.dim() == 0:
        raise InputError(f"{name}: X and y need a first (example) dimension, got shapes {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{name}: X has {x.shape[0]} rows but y has {y.shape[0]}; pass one label per example")
    if x.shape[0] == 0:
        raise InputError(f"{name} is empty (0 examples); pass at least one example")
    return x, y


@contextlib.contextmanager
def _side_effect_free(model: torch.nn.Module) -> Iterator[None]:
    """No gradient, eval mode (BatchNorm statistics untouched), random state restored on exit."""
    devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    was_training = model.training
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def _first_layer(model: torch.nn.Module, x: torch.Tensor) -> Optional[str]:
    """What the model's first Linear/Conv layer expects, when that is what ``x`` gets wrong."""

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            got = {int(x.shape[-1]), math.prod(int(d) for d in x.shape[1:])}
            if module.in_features in got:
                return None  # the first layer fits; the mismatch is further in
            return f"its first layer {name or 'Linear'} expects {module.in_features} features per example"
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            if x.dim() > 1 and int(x.shape[1]) == module.in_channels:
                return None
            return f"its first layer {name or 'Conv'} expects {module.in_channels} input channels"
    return None


def _probe(model: torch.nn.Module, x: torch.Tensor, name: str, obs_site: str, device: Any):
    """One forward pass on two examples; the observation site's distribution (or None)."""

    xb = x[:2]
    if device is not None:
        xb = xb.to(device)
    try:
        with _side_effect_free(model), poutine.block():
            trace = poutine.trace(model).get_trace(xb)
    except (RuntimeError, IndexError) as err:
        expected = _first_layer(model, x)
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{name}: examples of shape {tuple(x.shape[1:])} do not fit the model"
            + (f": {expected}" if expected else "") + f" (torch: {line[:160]})"
        ) from None
    except Exception:  # e.g. a model whose forward needs y; training will tell
        return None
    site = trace.nodes.get(obs_site)
    return None if site is None else site.get("fn")


def model_output_width(fn: Any) -> Optional[int]:
    """Number of classes of a categorical observation distribution (None if not categorical)."""
    base = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    if type(base).__name__ not in ("Categorical", "OneHotCategorical"):
        return None
    logits = getattr(base, "logits", None)
    return int(logits.shape[-1]) if logits is not None else None


def check_labels(y: torch.Tensor, num_classes: int, name: str = "data") -> None:
    """Labels must be integers in ``0 .. num_classes - 1`` (:class:`InputError` lists the others)."""
    if y.is_floating_point():
        finite = torch.isfinite(y)
        fractional = ~finite | (y != torch.round(y))
        if fractional.any():
            shown = sorted({float(v) for v in y[fractional].flatten()[:1000].tolist()})
            raise InputError(f"{name}: a classifier needs integer labels, y holds {_shown(shown)}; "
                             "pass class indices 0..C-1 (e.g. y.long())")
    elif y.dtype == torch.bool or y.is_complex():
        raise InputError(f"{name}: a classifier needs integer labels, y has dtype {y.dtype}")
    if y.numel() and 0 <= float(y.min()) and float(y.max()) <= num_classes - 1:
        return
    outside = (y < 0) | (y > num_classes - 1)
    if outside.any():
        bad = sorted({int(v) for v in y[outside].flatten().tolist()})
        raise InputError(f"{name}: labels must be in 0..{num_classes - 1} for a model with {num_classes} outputs; "
                         f"y holds {_shown(bad)}")


def check_data(data: Any, model: Any = None, *, name: str = "data", obs_site: str = "obs", device: Any = None,
               labels: bool = True) -> None:
    """Check ``data`` (``(X, y)``, ``X`` alone with ``labels=False``, or a DataLoader) against ``model``.

    Raises :class:`InputError` (a ``ValueError``) with a one-line message for: X/y of different
    lengths, no examples, non-finite features, examples the model cannot take, non-integer or
    out-of-range labels of a classifier. The model (an ``nn.Module``) is run once on two examples
    with its random state, mode and gradients left as they were; a model that is not an
    ``nn.Module``, or whose forward needs more than ``X``, gets the checks that need no model.
    """

    if isinstance(data, DataLoader):
        dataset = data.dataset
        if not (isinstance(dataset, TensorDataset) and len(dataset.tensors) in (1, 2)):
            return  # arbitrary datasets are not scanned up front
        data = tuple(dataset.tensors) if len(dataset.tensors) == 2 else dataset.tensors[0]
    if torch.is_tensor(data):
        x, y = data, None
    else:
        x, y = check_pair(data, name)
    check_features(x, name)
    fn = None
    if isinstance(model, torch.nn.Module):
        fn = _probe(model, x, name, obs_site, device)
    if y is None or fn is None or not labels:
        return
    width = model_output_width(fn)
    if width is not None:
        check_labels(y, width, name)
