"""Pieces both compaction engines share: :class:`Scale`, :class:`CompactModel`, reading E[theta] * mask
from the guide, and slicing a layer's rows/columns."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..nn import NoisyClassifier, noise_modules


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


_POOL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


# f(s x) = s f(x) for s > 0, and f(0) = 0: a positive per-channel factor passes through them.
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d) + _POOL


# f(0) = 0 but not homogeneous: pruned channels stay zero, the factor must be applied before them.
_ZERO_PRESERVING = (
    nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Hardtanh, nn.Softsign, nn.Mish,
    nn.Hardswish, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
)


# Channelwise but f(0) != 0: a pruned channel becomes a constant, so it cannot be removed past them.
_CHANNELWISE_OTHER = (nn.Sigmoid, nn.Softplus, nn.LogSigmoid, nn.Hardsigmoid) + _BATCHNORM


class Scale(nn.Module):
    """Multiply the input by a per-channel factor ``scale`` along ``channel_dim`` (batch first).

    What remains of a noise layer whose E[theta] could not be folded into a following linear map.
    """

    def __init__(self, scale: torch.Tensor, channel_dim: int = -1) -> None:
        super().__init__()
        if channel_dim == 0:
            raise ValueError("channel_dim cannot be 0: the first dimension is the batch")
        self.scale = nn.Parameter(torch.as_tensor(scale).detach().clone().reshape(-1))
        self.channel_dim = int(channel_dim)

    def extra_repr(self) -> str:
        return f"num_channels={self.scale.numel()}, channel_dim={self.channel_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim if self.channel_dim > 0 else x.dim() + self.channel_dim
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * self.scale.view(shape)


class CompactModel(nn.Module):
    """The compacted network (``body``) with its before/after figures in ``stats``.

    ``forward(x)`` returns what the masked model's backbone returns in ``"mean"`` mode (logits for
    a :class:`~bmrs_pyro.nn.NoisyClassifier`). It holds only ordinary modules and tensors, so it
    can be saved with ``torch.save`` and fine-tuned like any network. It is built in eval mode
    (BatchNorm uses its running statistics, dropout is off), the mode the equivalence holds in.

    ``stats`` (see :func:`compression_stats`): ``params_before``/``params_after``,
    ``flops_before``/``flops_after`` (``torch.utils.flop_counter`` on ``example_input``; ``None``
    without it), their ratios, ``layers`` = ``{site: {"structures", "kept", "width", "folded"}}``
    (``kept``: structures with mask 1; ``width``: channels physically present), ``method``,
    ``max_abs_diff`` against the masked model on ``example_input`` and ``notes``.
    """

    def __init__(self, body: nn.Module, stats: dict) -> None:
        super().__init__()
        self.body = body
        self.stats = stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def report(self) -> str:
        """A human-readable summary of ``stats``."""
        s = self.stats
        lines = [f"compaction ({s['method']}):"]
        lines.append(
            f"  parameters {s['params_before']:,} -> {s['params_after']:,} "
            f"({100 * (1 - s['params_ratio']):.1f} % removed)"
        )
        if s["flops_before"] is not None:
            lines.append(
                f"  FLOPs      {s['flops_before']:,} -> {s['flops_after']:,} "
                f"({100 * (1 - s['flops_ratio']):.1f} % removed)"
            )
        for site, info in s["layers"].items():
            how = "folded" if info["folded"] else "Scale kept"
            lines.append(
                f"  {site}: {info['kept']}/{info['structures']} kept, width {info['width']} ({how})"
            )
        if s["max_abs_diff"] is not None:
            lines.append(f"  max |compact - masked| on example_input: {s['max_abs_diff']:.3g}")
        lines.extend(f"  note: {n}" for n in s["notes"])
        return "\n".join(lines)


class _Unsupported(Exception):
    """The sequential walker cannot handle this network; the message says why."""


def _backbone(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"compact expects a torch.nn.Module or NoisyClassifier, got {type(model).__name__}")
    return model.net if isinstance(model, NoisyClassifier) else model


def _check_deterministic(net: nn.Module) -> None:
    # PyroModules with PyroSample attributes (bayesianize) draw their weights at every call:
    # there is no single network to compact.
    for name, module in net.named_modules():
        samples = module.__dict__.get("_pyro_samples")
        if samples:
            raise ValueError(
                f"module {name or '<root>'} has Bayesian (PyroSample) weights {sorted(samples)}; "
                "compact needs fixed weights: set them to their posterior means first"
            )


def _posterior_means(net: nn.Module, guide: Any) -> dict[int, tuple[str, torch.Tensor]]:
    """id(layer) -> (site name, E_q[theta] * mask) for every noise layer of ``net``."""
    out = {}
    sites = getattr(guide, "site_names", None) if guide is not None else None
    for site, layer in noise_modules(net).items():
        with torch.no_grad():
            if guide is not None:
                if sites is not None and site not in sites:
                    raise ValueError(
                        f"the guide has no site {site!r} (it has {sites}); pass the guide fitted "
                        "to this model, after it has run once"
                    )
                mean = guide.posterior(site).mean
            else:
                try:
                    mean = layer.posterior_mean()
                except RuntimeError as err:
                    raise ValueError(str(err)) from None
            mean = torch.as_tensor(mean).detach().to(layer.mask.device, layer.mask.dtype).reshape(-1)
        if mean.numel() != layer.num_structures:
            raise ValueError(f"{site}: E[theta] has {mean.numel()} entries, the layer {layer.num_structures}")
        if not torch.isfinite(mean).all() or (mean < 0).any():
            raise ValueError(f"{site}: E[theta] must be finite and >= 0")
        out[id(layer)] = (site, mean * layer.mask)
    return out


def _take_out(module: nn.Module, keep: torch.Tensor) -> None:
    """Keep only output channels ``keep`` of a Linear/Conv/BatchNorm/Scale (in place)."""
    with torch.no_grad():
        if isinstance(module, Scale):
            module.scale = nn.Parameter(module.scale.data[keep].clone())
            return
        if isinstance(module, _BATCHNORM):
            for name in ("weight", "bias"):
                p = getattr(module, name)
                if p is not None:
                    setattr(module, name, nn.Parameter(p.data[keep].clone()))
            for name in ("running_mean", "running_var"):
                b = getattr(module, name)
                if b is not None:
                    setattr(module, name, b[keep].clone())
            module.num_features = int(keep.numel())
            return
        module.weight = nn.Parameter(module.weight.data[keep].clone())
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.data[keep].clone())
        if isinstance(module, nn.Linear):
            module.out_features = int(keep.numel())
        else:
            module.out_channels = int(keep.numel())


def _take_in(module: nn.Module, columns: torch.Tensor, factor: torch.Tensor) -> None:
    """Keep input columns/channels ``columns`` of a Linear/Conv, multiplied by ``factor``."""
    with torch.no_grad():
        w = module.weight.data[:, columns]
        shape = [1, -1] + [1] * (w.dim() - 2)
        module.weight = nn.Parameter((w * factor.to(w.dtype).view(shape)).clone())
        if isinstance(module, nn.Linear):
            module.in_features = int(columns.numel())
        else:
            module.in_channels = int(columns.numel())


def _expand(index: torch.Tensor, factor: torch.Tensor, per_channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel indices/factors -> flattened feature indices/factors (channel-major flatten)."""
    if per_channel == 1:
        return index, factor
    offsets = torch.arange(per_channel, device=index.device)
    return (index[:, None] * per_channel + offsets).reshape(-1), factor.repeat_interleave(per_channel)


def _maps_zero_to_zero(module: nn.Module) -> bool:
    with torch.no_grad():
        return bool((module(torch.zeros(1, 1)) == 0).all())


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return int(counter.get_total_flops())


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
