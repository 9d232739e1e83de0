"""Shared by tests/test_low_precision.py, tests/test_cuda.py and tests/test_fast_paths.py: a tiny
zoo MLP with its guide, a recorder of float64 op outputs, and the loss-agreement check of the
model's-dtype hot path (issue 15)."""

from __future__ import annotations

import collections
import contextlib
from unittest import mock

import pyro
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import bmrs_pyro._fast_paths as fast_paths
import bmrs_pyro._low_precision as low_precision
from bmrs_pyro import AutoTruncatedLogNormal, fit
from bmrs_pyro._low_precision import _forced_low_precision
from bmrs_pyro.elbo import MeanFieldNoiseELBO
from bmrs_pyro.models import build


class DtypeRecorder(TorchDispatchMode):
    """Counts, per aten op, the float64 tensors among every op's outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.float64 = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.float64[str(func)] += 1
        return out


def zoo(init_loc: float = -0.4, init_scale: float = 0.6, seed: int = 4):
    """A zoo MLP 12-7-5-3 with its guide set up on a batch of 9: ``model, guide, x, y``."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    model = build("mlp", (12,), 3, hidden=(7, 5))
    guide = AutoTruncatedLogNormal(model, init_loc=init_loc, init_scale=init_scale)
    x, y = torch.randn(9, 12), torch.randint(0, 3, (9,))
    guide(x, y)
    return model, guide, x, y


def float64_ops_in_one_fit_step(init_loc: float, *, forced: bool = False, device: str = "cpu",
                                model_class=None) -> collections.Counter:
    """Float64 tensors output by any op during ``fit`` (1 epoch, 1 batch, the guide set up inside
    it) of a tiny zoo MLP (or ``model_class((12, 7, 5, 3), noise="global")``) on ``device``,
    under the forced low-precision switch when ``forced``."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    if model_class is None:
        model = build("mlp", (12,), 3, hidden=(7, 5))
    else:
        model = model_class((12, 7, 5, 3), noise="global")
    guide = AutoTruncatedLogNormal(model, init_loc=init_loc)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    recorder = DtypeRecorder()
    with _forced_low_precision() if forced else contextlib.nullcontext(), recorder:
        fit(model, guide, (x, y), epochs=1, batch_size=16, seed=0, device=device, progress=False)
    assert all(torch.isfinite(p).all() for p in guide.parameters())
    return recorder.float64


def loss_and_grads(device: str, forced: bool = False, seed: int = 8):
    """The one-pass loss and its gradients for the tiny zoo MLP on ``device``, its uniforms drawn
    on the CPU (so that every device sees the same ones) and moved to ``device``. All
    structures are in the sampler's fast region, where the CPU path draws float32 uniforms too."""
    model, guide, x, y = zoo()
    model.to(device), guide.to(device)  # as fit(device=...) moves them
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, dtype, dev):
        return torch.rand(shape, dtype=dtype, generator=gen).clamp(min=torch.finfo(dtype).tiny).to(dev)

    params = list(model.parameters()) + list(guide.parameters())
    with mock.patch.object(fast_paths, "_uniform", uniform), mock.patch.object(low_precision, "_uniform", uniform), \
            (_forced_low_precision() if forced else contextlib.nullcontext()):
        loss = MeanFieldNoiseELBO().differentiable_loss(model, guide, x.to(device), y.to(device))
    grads = torch.autograd.grad(loss, params)
    return loss.detach().cpu(), [g.cpu() for g in grads]


def assert_losses_agree(lp, ref) -> tuple[float, float]:
    """Value within 1e-5 relative; gradients within 1e-4 (|g| + max|g| / 100). Returns the errors."""
    (l_lp, g_lp), (l_ref, g_ref) = lp, ref
    rel = abs(float(l_lp) - float(l_ref)) / abs(float(l_ref))
    worst = max(float(((a - b).abs() / (b.abs() + b.abs().max() / 100 + 1e-30)).max()) for a, b in zip(g_lp, g_ref))
    assert rel <= 1e-5 and worst <= 1e-4, (rel, worst)
    return rel, worst
