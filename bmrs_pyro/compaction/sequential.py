"""The sequential engine: walks an ``nn.Sequential`` (nested ones flattened) in order, removing
pruned rows/channels and folding E[theta] into the next Linear/Conv (``method="sequential"``)."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..nn import MultiplicativeNoise
from .common import _BATCHNORM, _CHANNELWISE_OTHER, _CONV, _HOMOGENEOUS, _POOL, _ZERO_PRESERVING, Scale, _expand, _maps_zero_to_zero, _take_in, _take_out, _Unsupported


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


class _Chain:
    """What happened to the channels of the last producer (Linear/Conv) since it ran."""

    def __init__(self, producer: Optional[int], width: Optional[int], kind: str) -> None:
        self.producer = producer  # index into the output list, None = the network input
        self.width = width  # channels of the producer's output
        self.kind = kind  # "linear" (features last), "conv" (channels at dim 1), "flat", "input"
        self.channelwise: list[int] = []  # BatchNorm / materialised Scale to slice with it
        self.placeholders: list[int] = []  # noise positions whose factor is still pending
        self.scale: Optional[torch.Tensor] = None  # pending factor, product of noise means
        self.alive: Optional[torch.Tensor] = None  # channel not identically zero here
        self.sites: list[str] = []


class _SequentialCompactor:
    def __init__(self, means: dict[int, tuple[str, torch.Tensor]]) -> None:
        self.means = means
        self.out: list[Optional[nn.Module]] = []
        self.layers: dict[str, dict] = {}
        self.notes: list[str] = []

    def run(self, net: nn.Module) -> nn.Sequential:
        chain = _Chain(None, None, "input")
        for module in _leaves(net):
            chain = self._step(chain, module)
        self._materialise(chain)
        self._finish(chain, consumer=None)
        return nn.Sequential(*[m for m in self.out if m is not None])

    # -- one module ----------------------------------------------------------------------------
    def _step(self, chain: _Chain, module: nn.Module) -> _Chain:
        if isinstance(module, MultiplicativeNoise):
            self._noise(chain, module)
            return chain
        if isinstance(module, (nn.Linear,) + _CONV):
            return self._linear_map(chain, module)
        if isinstance(module, nn.Flatten):
            if (module.start_dim, module.end_dim) != (1, -1):
                raise _Unsupported(f"Flatten(start_dim={module.start_dim}, end_dim={module.end_dim})")
            if chain.kind == "conv":
                chain.kind = "flat"
            elif chain.kind == "linear":
                raise _Unsupported("Flatten after a Linear layer (features could be mixed)")
            self.out.append(copy.deepcopy(module))
            return chain
        if isinstance(module, _HOMOGENEOUS):
            if isinstance(module, _POOL) and getattr(module, "return_indices", False):
                raise _Unsupported(f"{type(module).__name__} with return_indices=True")
            self.out.append(copy.deepcopy(module))
            return chain
        if isinstance(module, _ZERO_PRESERVING + _CHANNELWISE_OTHER):
            if isinstance(module, _BATCHNORM):
                if chain.kind in ("input", "flat") or module.num_features != chain.width:
                    raise _Unsupported(f"{type(module).__name__}({module.num_features}) not right after a layer")
                self.out.append(copy.deepcopy(module))
                chain.channelwise.append(len(self.out) - 1)
            else:
                self.out.append(copy.deepcopy(module))
            keeps_zero = isinstance(module, _ZERO_PRESERVING) and _maps_zero_to_zero(module)
            if chain.placeholders:
                # The pending factor must be applied before this op: it becomes a Scale at the
                # last noise position, which is valid as only homogeneous ops lie in between.
                self._materialise(chain)
            if not keeps_zero and chain.alive is not None:
                chain.alive = torch.ones_like(chain.alive)  # zeros became constants: keep them
            return chain
        raise _Unsupported(f"module {type(module).__name__} is not a supported sequential layer")

    def _noise(self, chain: _Chain, layer: MultiplicativeNoise) -> None:
        site, value = self.means[id(layer)]
        s = layer.num_structures
        if chain.kind == "input":
            # Noise on the network input: its shape must stay, so the layer becomes a Scale.
            self.out.append(Scale(value, layer.channel_dim))
            self.layers[site] = {"structures": s, "kept": int(layer.mask.sum()), "width": s, "folded": False}
            self.notes.append(f"{site}: noise on the network input cannot remove inputs; kept as a Scale")
            return
        dim = layer.channel_dim
        if chain.kind == "conv":
            ok = dim == 1
        else:
            ok = dim == -1 and (chain.kind != "flat" or s == chain.width)
        if not ok or s != chain.width:
            raise _Unsupported(
                f"{site}: {s} structures on channel_dim={dim} do not match the {chain.width} "
                f"channels of the preceding layer ({chain.kind})"
            )
        if chain.kind == "flat":
            chain.kind = "linear"  # (N, C) features, one per channel
        if chain.scale is None:
            chain.scale = torch.ones_like(value)
            chain.alive = torch.ones(s, dtype=torch.bool, device=value.device)
        chain.scale = chain.scale * value
        chain.alive = chain.alive & (value != 0)
        self.out.append(Scale(torch.ones_like(value), dim))  # placeholder, resolved later
        chain.placeholders.append(len(self.out) - 1)
        chain.sites.append(site)
        self.layers[site] = {"structures": s, "kept": int(layer.mask.sum()), "width": s, "folded": True}

    def _materialise(self, chain: _Chain) -> None:
        """Turn the pending factor into a Scale at the last noise position."""
        if not chain.placeholders:
            return
        *earlier, last = chain.placeholders
        for i in earlier:
            self.out[i] = None
        with torch.no_grad():
            self.out[last].scale.copy_(chain.scale)
        chain.channelwise.append(last)
        chain.placeholders = []
        chain.scale = torch.ones_like(chain.scale)
        for site in chain.sites:
            self.layers[site]["folded"] = False

    def _linear_map(self, chain: _Chain, module: nn.Module) -> _Chain:
        module = copy.deepcopy(module)
        if isinstance(module, _CONV) and module.groups != 1:
            raise _Unsupported(f"grouped convolution (groups={module.groups})")
        in_width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        if chain.kind != "input":
            if isinstance(module, nn.Linear):
                if chain.kind == "conv":
                    raise _Unsupported("Linear applied to conv feature maps without Flatten")
                fits = in_width % chain.width == 0 if chain.kind == "flat" else in_width == chain.width
            else:
                fits = chain.kind == "conv" and in_width == chain.width
            if not fits:
                raise _Unsupported(
                    f"{type(module).__name__} with {in_width} inputs after {chain.width} channels ({chain.kind})"
                )
        self._finish(chain, consumer=module)
        self.out.append(module)
        out_width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        return _Chain(len(self.out) - 1, out_width, "linear" if isinstance(module, nn.Linear) else "conv")

    def _finish(self, chain: _Chain, consumer: Optional[nn.Module]) -> None:
        """Remove dead channels of ``chain`` and fold its factor into ``consumer``."""
        if chain.producer is None or chain.scale is None:
            return
        if consumer is None:
            # End of the network: its output keeps every channel (the Scale was materialised).
            return
        alive = chain.alive
        keep = alive.nonzero().reshape(-1)
        if keep.numel() == 0:
            keep = keep.new_zeros(1)  # placeholder: factor 0, see the module docstring
            self.notes.append(f"{', '.join(chain.sites)}: every structure pruned; one zero-weighted placeholder kept")
        factor = (chain.scale * alive.to(chain.scale.dtype))[keep]
        if keep.numel() < chain.width:
            _take_out(self.out[chain.producer], keep)
            for i in chain.channelwise:
                _take_out(self.out[i], keep)
        in_width = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
        columns, factor = _expand(keep, factor, in_width // chain.width)
        _take_in(consumer, columns, factor)
        for i in chain.placeholders:
            self.out[i] = None
        for site in chain.sites:
            self.layers[site]["width"] = int(keep.numel())
