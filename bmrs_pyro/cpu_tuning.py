"""Exact rewrites that make a (compacted) convolutional network faster on CPU.

Compaction removes channels, but on CPU the latency of a small conv net does not shrink with its
FLOPs: ``nn.MaxPool2d`` computes indices it then throws away and costs more than the convolution
before it, and oneDNN's convolution has a fixed cost per call that dominates at a few channels.
:func:`tune_for_cpu` rewrites a copy of the network so that its CPU latency follows its work:

* every 2x2, stride-2 ``nn.MaxPool2d`` (no padding, no dilation, floor mode) becomes
  :class:`MaxPool2x2`, two elementwise maxima over strided views;
* ``ReLU`` and non-negative per-channel ``Scale`` modules that come right before such a pool in an
  ``nn.Sequential`` move after it: both commute with a max (``max(relu(x)) = relu(max(x))``,
  ``max(s x) = s max(x)`` for ``s >= 0``) and then touch four times fewer elements;
* each ``nn.Conv2d`` runs on whichever CPU kernel (oneDNN or PyTorch's native one) is faster on
  its actual input, measured once here (:class:`NativeConv2d` holds the ones that run natively).

Every rewrite computes the same function; the result is checked against the original on the
example input. The output is for CPU inference: keep the untuned module for training, export or
GPUs. Apply it to both sides of a latency comparison, so that the comparison measures what the
structures removed, not these rewrites.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Optional

import torch
import torch.nn as nn

from .compaction import Scale

__all__ = ["MaxPool2x2", "NativeConv2d", "tune_for_cpu"]


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` (floor mode) as two ``torch.maximum`` calls over strided views, then the
    optional pointwise modules moved past it (``after``)."""

    def __init__(self, after: Optional[list[nn.Module]] = None) -> None:
        super().__init__()
        self.after = nn.Sequential(*(after or []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w]
        x = torch.maximum(x[..., 0::2], x[..., 1::2])
        x = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
        return self.after(x) if len(self.after) else x


class NativeConv2d(nn.Module):
    """Runs ``conv`` with oneDNN switched off (PyTorch's own CPU kernels), restoring the setting."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            return self.conv(x)
        finally:
            torch._C._set_mkldnn_enabled(enabled)


def _is_pool2x2(m: nn.Module) -> bool:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (
        type(m) is nn.MaxPool2d
        and pair(m.kernel_size) == (2, 2)
        and pair(m.stride if m.stride is not None else m.kernel_size) == (2, 2)
        and pair(m.padding) == (0, 0)
        and pair(m.dilation) == (1, 1)
        and not m.ceil_mode
        and not m.return_indices
    )


def _commutes_with_max(m: nn.Module) -> bool:

    if type(m) is nn.ReLU:
        return True
    # A channel scale commutes with a spatial max when it is non-negative and acts on channels
    # (dim 1 of an (N, C, H, W) map), not on the pooled dimensions.
    return isinstance(m, Scale) and m.channel_dim in (1, -3) and bool((m.scale >= 0).all())


def _rewrite_pools(module: nn.Module) -> int:
    """Replace 2x2 pools in place (moving commuting modules past them); returns how many."""
    count = 0
    if isinstance(module, nn.Sequential):
        out: list[nn.Module] = []
        for m in module:
            if _is_pool2x2(m):
                moved: list[nn.Module] = []
                while out and _commutes_with_max(out[-1]):
                    moved.insert(0, out.pop())
                out.append(MaxPool2x2(moved))
                count += 1
            else:
                out.append(m)
        if count:
            for key in list(module._modules):
                del module._modules[key]
            for i, m in enumerate(out):
                module.add_module(str(i), m)
    for name, child in list(module.named_children()):
        if isinstance(child, MaxPool2x2):
            continue
        if _is_pool2x2(child):
            setattr(module, name, MaxPool2x2())
            count += 1
        else:
            count += _rewrite_pools(child)
    return count


def _median_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _choose_conv_kernels(root: nn.Module, x: torch.Tensor, repeats: int) -> list[str]:
    inputs: dict[nn.Module, torch.Tensor] = {}

    def record(m, args, out) -> None:  # a hook that returned a value would replace the output
        inputs.setdefault(m, args[0])

    hooks = [m.register_forward_hook(record) for m in root.modules() if type(m) is nn.Conv2d]
    try:
        root(x)
    finally:
        for h in hooks:
            h.remove()
    native = []
    for parent_name, parent in list(root.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Conv2d or child not in inputs:
                continue
            xi = inputs[child]
            wrapped = NativeConv2d(child)
            # Interleave the two kernels twice so that load from other processes hits both.
            one_dnn = min(_median_seconds(child, xi, repeats), _median_seconds(child, xi, repeats))
            own = min(_median_seconds(wrapped, xi, repeats), _median_seconds(wrapped, xi, repeats))
            if own < 0.9 * one_dnn:  # switch only for a clear win
                setattr(parent, name, wrapped)
                native.append(f"{parent_name}.{name}".lstrip("."))
    return native


@torch.inference_mode()
def tune_for_cpu(
    module: nn.Module, example_input: torch.Tensor, *, repeats: int = 15, atol: float = 1e-5
) -> nn.Module:
    """A copy of ``module`` rewritten for fast CPU inference (see the module docstring).

    Args:
        module: any ``nn.Module`` on the CPU, e.g. the result of :func:`~bmrs_pyro.compact`.
        example_input: a batch like the ones it will serve; convolution kernels are timed on it.
        repeats: timed calls per kernel and layer.
        atol: the largest difference from ``module`` on ``example_input`` accepted.

    Returns:
        The tuned copy, in eval mode, with ``tuning = {"pools": n, "native_convs": [names]}``.
        ``module`` itself is not changed.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not torch.is_tensor(example_input):
        raise TypeError("example_input must be a tensor batch")
    devices = {p.device.type for p in module.parameters()} | {example_input.device.type}
    if devices != {"cpu"}:
        raise ValueError(f"tune_for_cpu works on CPU modules and inputs, found {sorted(devices)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    tuned = copy.deepcopy(module).eval()
    was_training = module.training
    module.eval()
    try:
        expected = module(example_input)
    finally:
        module.train(was_training)
    pools = _rewrite_pools(tuned)
    native = _choose_conv_kernels(tuned, example_input, repeats)
    got = tuned(example_input)
    diff = float((got - expected).abs().max()) if got.numel() else 0.0
    if not diff <= atol:
        raise RuntimeError(f"tuned module differs from the original by {diff:.3g} > atol={atol}")
    tuned.tuning = {"pools": pools, "native_convs": native, "max_abs_diff": diff}
    return tuned
