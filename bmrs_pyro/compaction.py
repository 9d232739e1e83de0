"""Physical compaction: a plain network with the pruned structures removed and E[theta] folded in.

In ``"mean"`` mode a noise layer multiplies structure ``c`` by ``m_c = E_q[theta_c] * mask_c``.
:func:`compact` turns the masked network into an ordinary ``torch.nn.Module`` computing the same
function with no Pyro and no noise layers:

* a structure with ``m_c = 0`` is removed: the output filter/row of the layer producing it, its
  BatchNorm entries and the matching input columns/channels of the next Linear/Conv;
* the kept ``m_c > 0`` are folded into the next layer's input weights ``W[:, c] *= m_c``. Folding
  crosses ReLU, LeakyReLU, max/avg pooling, dropout and flatten (they commute with a positive
  per-channel factor; flatten repeats the factor over the H*W columns of each channel). Where
  another op sits between the noise and the next linear map (tanh after the noise, BatchNorm, the
  end of the network, an addition in a residual graph) the factor stays as a small :class:`Scale`.

Two engines. A network that is an ``nn.Sequential`` (nested ones are flattened) of Linear, Conv,
BatchNorm, elementwise activations, pooling, dropout, flatten and noise layers is walked in order
(``method="sequential"``). Any other graph -- e.g. a ResNet whose blocks add skip connections --
goes through Torch-Pruning's ``DependencyGraph`` (``method="graph"``, needs ``example_input`` to
trace): every noise layer first becomes a :class:`Scale`, then channels are removed group by
group, where a group is the set of layers Torch-Pruning couples through additions, reshapes and
concatenations, and removing a channel removes it from every layer of its group.

**Coupled channels.** A channel of a group is removed only if it is identically zero at the input
of every Linear/Conv of the group that reads it, i.e. every path into such a layer ends in a noise
layer pruning that channel, through zero-preserving ops only (ReLU-like activations, pooling,
reshapes; for an addition, *every* summand). With an identity skip ``h0 + noise1(...)`` where
``h0 = noise0(...)``, a channel goes only if it is pruned in both noise0 and noise1; a channel
pruned in one of them stays everywhere (still exact, only less compact). Paths through
BatchNorm, sigmoid, a constant or an op the analysis does not know keep the whole group. A
graph-engine result may keep the model's own container classes (no noise layers, no sample
sites).

**Structures only their module understands.** Where a noise layer scales something no
Linear/Conv channel stands for -- e.g. attention heads, a reshaped (N, heads, T, d) tensor -- the
module that owns it can define ``compact_structures(child_name, factor) -> width``. The graph
engine calls it on its copy with ``factor = E[theta] * mask`` per structure before anything else;
the hook removes the structures with factor 0 from its own weights, folds the others' factors
and replaces the noise layer (e.g. with ``nn.Identity``). The zoo's ViT attention does this.

A layer pruned to zero width has an identically zero output. It is not an error: the compacted
network keeps **one placeholder structure** whose folded factor is 0 (so the downstream layer
adds only its bias), which reproduces the masked network exactly and keeps every shape valid;
``stats["layers"][site]`` then shows ``kept == 0`` and ``width == 1``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .nn import MultiplicativeNoise, NoisyClassifier, noise_mode, noise_modules

METHODS = ("auto", "sequential", "graph")

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


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Channel surgery on single modules
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Sequential engine
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Graph engine (Torch-Pruning)
# ---------------------------------------------------------------------------------------------

# Autograd op names (lowercase, digits stripped) that act on each channel separately.
_CHANNELWISE_OPS = {
    "relu", "leakyrelu", "hardtanh", "gelu", "silu", "elu", "tanh", "sigmoid", "softplus",
    "hardswish", "hardsigmoid", "mish", "maxpooldwithindices", "maxpoold", "avgpoold",
    "adaptiveavgpoold", "adaptivemaxpoold", "add", "sub", "mul", "div", "clone", "nativedropout",
}
# ... of which these keep an all-zero channel at zero (add/sub: when every operand is zero).
_ZERO_PATH_OPS = {
    "relu", "leakyrelu", "hardtanh", "gelu", "silu", "elu", "tanh", "hardswish", "mish",
    "maxpooldwithindices", "maxpoold", "avgpoold", "adaptiveavgpoold", "adaptivemaxpoold",
    "add", "sub", "clone", "nativedropout",
}
# ... and these also commute with a positive per-channel factor (folding may cross them).
_FOLD_PATH_OPS = {
    "relu", "leakyrelu", "maxpooldwithindices", "maxpoold", "avgpoold", "adaptiveavgpoold",
    "adaptivemaxpoold", "clone", "nativedropout",
}


def _op_name(node) -> str:
    fn = node.grad_fn
    name = fn.name() if fn is not None and hasattr(fn, "name") else ""
    return "".join(ch for ch in name.lower().replace("backward", "") if not ch.isdigit())


def _op_in(node, names: set) -> bool:
    """Is ``node`` an elementwise-type op among ``names``? A mean/sum counts when it reduces only
    dims >= 2 (spatial pooling, e.g. ``AdaptiveAvgPool2d(1)`` on CPU): channelwise, homogeneous."""
    from torch_pruning import ops

    if node.type != ops.OPTYPE.ELEMENTWISE:
        return False
    name = _op_name(node)
    if name in ("mean", "sum"):
        fn = node.grad_fn
        dims, sizes = getattr(fn, "_saved_dim", None), getattr(fn, "_saved_self_sym_sizes", None)
        if dims is None or sizes is None:
            return False
        rank = len(sizes)
        dims = [(d - 2**64 if d >= 2**63 else d) % rank for d in dims]  # negative dims come unsigned
        return rank >= 3 and min(dims) >= 2
    return name in names


def _linear_core(node) -> Optional[nn.Linear]:
    """The Linear whose internal matmul ``node`` is (a Linear on (N, T, D) inputs is traced as
    view -> addmm -> view, and only the last view is the module's node), else None."""
    from torch_pruning import ops

    if node.type != ops.OPTYPE.ELEMENTWISE or _op_name(node) not in ("addmm", "mm", "matmul", "bmm"):
        return None
    if len(node.outputs) != 1 or not isinstance(node.outputs[0].module, nn.Linear):
        return None
    linear = node.outputs[0].module
    operands = {id(getattr(f, "variable", None)) for f, _ in node.grad_fn.next_functions if f is not None}
    weights = {id(p) for p in linear.parameters()}
    # the matmul of this Linear reads its own weight (through a transpose node) or bias
    uses_own = bool(operands & weights) or any(_only_params(n, weights) for n in node.inputs)
    return linear if uses_own else None


def _tp():
    import torch_pruning as tp

    class ScalePruner(tp.pruner.BasePruningFunc):
        TARGET_MODULES = (Scale,)

        def prune_out_channels(self, layer: Scale, idxs: Sequence[int]) -> Scale:
            drop = set(int(i) for i in idxs)
            keep = torch.tensor([i for i in range(layer.scale.numel()) if i not in drop], dtype=torch.long)
            _take_out(layer, keep)
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: Scale) -> int:
            return layer.scale.numel()

        get_in_channels = get_out_channels

    return tp, ScalePruner()


class _GraphCompactor:
    def __init__(self, means: dict[int, tuple[str, torch.Tensor]]) -> None:
        self.means = means
        self.layers: dict[str, dict] = {}
        self.notes: list[str] = []

    def run(self, net: nn.Module, example_input: torch.Tensor) -> nn.Module:
        body, scales = _dense_copy(net, self.means)
        for name, module in net.named_modules():
            if isinstance(module, MultiplicativeNoise):
                site = self.means[id(module)][0]
                self.layers[site] = {
                    "structures": module.num_structures, "kept": int(module.mask.sum()),
                    "width": module.num_structures, "folded": False,
                }
        self._delegate(body, scales)
        _check_no_sample_sites(body, example_input)
        if not scales:
            return body
        tp, pruner = _tp()
        graph = tp.DependencyGraph().build_dependency(
            body, example_input, customized_pruners={Scale: pruner}, verbose=False
        )
        plans = []
        for group in graph.get_all_groups(root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            remove = self._removable(graph, group, scales)
            if remove:
                root = group[0].dep
                plans.append((root.target.module, root.handler, remove))
        try:
            for module, handler, remove in plans:
                graph.get_pruning_group(module, handler, remove).prune()
            for scale, site in scales.items():
                self.layers[site]["width"] = scale.scale.numel()
            self._fold(body, graph, scales, example_input)
        except RuntimeError as err:  # e.g. a per-channel buffer Torch-Pruning does not know
            raise ValueError(
                f"Torch-Pruning could not remove channels of this {type(net).__name__} consistently "
                f"({err}); keep such layers unpruned or compact a simpler backbone"
            ) from err
        return body

    def _delegate(self, body: nn.Module, scales: dict) -> None:
        """Let modules that define ``compact_structures`` remove their own noise layers' structures."""
        for name, module in list(body.named_modules()):
            if module not in scales:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = body.get_submodule(parent_name) if parent_name else body
            hook = getattr(parent, "compact_structures", None)
            if hook is None:
                continue
            site = scales.pop(module)
            width = int(hook(child, module.scale.detach()))
            if isinstance(getattr(parent, child, None), Scale):
                raise ValueError(f"{type(parent).__name__}.compact_structures left its Scale {name!r} in place")
            self.layers[site].update(width=width, folded=True)

    def _removable(self, graph, group, scales: dict) -> list[int]:
        """Root indices that can be removed from ``group`` exactly (see the module docstring)."""
        from torch_pruning import ops

        consumers = []
        scale_roots: dict = {}  # Scale node -> {root index: [its channel indices]}
        for item in group:
            dep, module = item.dep, item.dep.target.module
            node = dep.target
            linear_map = isinstance(module, (nn.Linear,) + _CONV)
            # For Linear/Conv the in- and out-channel pruning functions differ.
            is_consumer = linear_map and not graph.is_out_channel_pruning_fn(dep.handler)
            if not node.outputs and not is_consumer:
                return []  # this channel is (part of) the network's output: it must stay
            if isinstance(module, Scale):
                roots = scale_roots.setdefault(node, {})
                for i, r in zip(item.idxs, item.root_idxs):
                    roots.setdefault(r, set()).add(i)
            elif linear_map:
                if isinstance(module, _CONV) and module.groups != 1:
                    return []
                if is_consumer:
                    consumers.append(node)
            elif isinstance(module, _BATCHNORM):
                pass
            elif node.type in (ops.OPTYPE.RESHAPE, ops.OPTYPE.CONCAT, ops.OPTYPE.SPLIT):
                pass
            elif _linear_core(node) is not None:
                pass
            elif _op_in(node, _CHANNELWISE_OPS) or (_op_in(node, {"t"}) and not node.inputs):
                # (a transpose without data inputs is a Linear's own weight)
                if any(f is None for f, _ in node.grad_fn.next_functions):
                    return []  # a tensor without grad enters, maybe one entry per channel
            
            else:
                return []  # an op that mixes channels, or one we do not know: keep all
        if not consumers or not scale_roots:
            return []
        zeros = _ZeroChannels(scale_roots)
        removable: Optional[set] = None
        for consumer in consumers:
            z = zeros.at_input(consumer)
            removable = z if removable is None else removable & z
        if not removable:
            return []
        roots = {r for item in group for r in item.root_idxs}
        remove = sorted(removable)
        if len(remove) >= len(roots):
            remove = remove[1:]  # placeholder channel with factor 0
            sites = sorted({scales[node.module] for node in scale_roots})
            self.notes.append(f"{', '.join(sites)}: every structure pruned; one zero-weighted placeholder kept")
        return remove

    def _fold(self, body: nn.Module, graph, scales: dict, example_input: torch.Tensor) -> None:
        shapes: dict[nn.Module, Any] = {}
        hooks = [
            m.register_forward_hook(lambda mod, inp, out: shapes.setdefault(mod, []).append((inp[0].shape, out.shape)))
            for m in body.modules()
            if isinstance(m, (Scale, nn.Linear) + _CONV)
        ]
        with torch.no_grad():
            body(example_input)
        for h in hooks:
            h.remove()
        for scale, site in scales.items():
            node = graph.module2node.get(scale)
            if node is None or len(shapes.get(scale, ())) != 1:
                continue
            consumer, reshaped, pooled = _fold_target(node)
            if consumer is None or len(shapes.get(consumer, ())) != 1:
                continue
            out_shape = shapes[scale][0][1]
            in_shape = shapes[consumer][0][0]
            c = scale.scale.numel()
            dim = scale.channel_dim if scale.channel_dim > 0 else len(out_shape) + scale.channel_dim
            index = torch.arange(c, device=scale.scale.device)
            # Pooling and flatten treat dim 1 as channels (flatten is channel-major); a factor on
            # another dim is folded only into a Linear acting on that (last) dim, reached
            # without pooling and with the shape unchanged.
            if isinstance(consumer, _CONV):
                if dim != 1 or reshaped or consumer.groups != 1 or consumer.in_channels != c:
                    continue
                columns, factor = index, scale.scale.data
            elif len(in_shape) == 2 and dim == 1 and in_shape[1] % c == 0:
                columns, factor = _expand(index, scale.scale.data, in_shape[1] // c)
            elif out_shape == in_shape and dim == len(out_shape) - 1 and in_shape[-1] == c and not pooled:
                # (a Linear on (N, T, D) views its input as (N*T, D) inside: last dim unchanged)
                columns, factor = index, scale.scale.data
            else:
                continue
            _take_in(consumer, columns, factor)
            name = next(n for n, m in body.named_modules() if m is scale)
            _set_submodule(body, name, nn.Identity())
            self.layers[site]["folded"] = True


def _dense_copy(net: nn.Module, means: dict) -> tuple[nn.Module, dict]:
    """A copy of ``net`` in eval mode with every noise layer replaced by ``Scale(E[theta] * mask)``:
    the masked network's mean-mode function without Pyro. Returns it and ``{Scale: site}``."""
    body = copy.deepcopy(net)
    originals = dict(net.named_modules())
    scales: dict[Scale, str] = {}
    for name, module in list(body.named_modules()):
        if isinstance(module, MultiplicativeNoise):
            # deepcopy made new layers; the original at the same path is the key of its mean.
            site, value = means[id(originals[name])]
            scale = Scale(value, module.channel_dim)
            _set_submodule(body, name, scale)
            scales[scale] = site
    return body.eval(), scales


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


class _ZeroChannels:
    """Which root channels are identically zero at the output of a node of one group.

    A Scale zeroes the channels whose factor is 0 and passes on those already zero at its input;
    a zero-preserving op (ReLU-like, pooling, reshape, an addition of such paths) keeps the
    channels zero in all its operands; anything else (BatchNorm, a Linear/Conv producing the
    channel, a constant or parameter entering the path) gives no zeros. Channel indices are the
    group's root indices, so reshapes and concatenations are mapped by Torch-Pruning.
    """

    def __init__(self, scale_roots: dict) -> None:
        self.scale_roots = scale_roots
        self.memo: dict = {}

    def at_input(self, consumer_node) -> set:
        own = {id(p) for p in consumer_node.module.parameters()}
        inputs = []
        for n in consumer_node.inputs:
            # look through the Linear's own internal matmul (inputs of rank > 2)
            inputs.extend(n.inputs if _linear_core(n) is consumer_node.module else [n])
        # A Linear's weight reaches it as a transpose node: not a data path.
        data = [n for n in inputs if not _only_params(n, own)]
        return self._all(data)

    def _all(self, nodes: list) -> set:
        if not nodes:
            return set()
        result = self.at_output(nodes[0])
        for node in nodes[1:]:
            result = result & self.at_output(node)
        return result

    def at_output(self, node) -> set:
        from torch_pruning import ops

        if node in self.memo:
            return self.memo[node]
        self.memo[node] = set()  # a cycle gives no zeros
        if node in self.scale_roots:
            scale = node.module.scale
            own = {id(p) for p in node.module.parameters()}
            zero = {r for r, idxs in self.scale_roots[node].items() if all(scale[i] == 0 for i in idxs)}
            data = [n for n in node.inputs if not _only_params(n, own)]
            result = zero | (self._all(data) if len(data) == 1 else set())
        elif (node.type == ops.OPTYPE.RESHAPE or _op_in(node, _ZERO_PATH_OPS)) and _data_only(node):
            result = self._all(node.inputs)
        else:
            result = set()
        self.memo[node] = result
        return result


def _data_only(node) -> bool:
    """Every operand of ``node`` comes from another traced op (no constant, buffer, parameter)."""
    fn = node.grad_fn
    operands = [f for f, _ in getattr(fn, "next_functions", ())]
    if not operands or len(operands) != len(node.inputs):
        return False
    return all(f is not None and not f.name().startswith("torch::autograd::AccumulateGrad") for f in operands)


def _only_params(node, own_params: set) -> bool:
    """``node`` computes only from the parameters ``own_params`` (e.g. the Scale's own view)."""
    if node.inputs:
        return False
    fn = node.grad_fn
    if fn is None:
        return False
    for f, _ in fn.next_functions:
        var = getattr(f, "variable", None)
        if var is None or id(var) not in own_params:
            return False
    return True


def _fold_target(scale_node) -> tuple[Optional[nn.Module], bool, bool]:
    """The single Linear/Conv the Scale's output reaches through fold-safe ops (or None), and
    whether a reshape and whether pooling lie on the way."""
    from torch_pruning import ops

    node, reshaped, pooled = scale_node, False, False
    while True:
        if len(node.outputs) != 1:
            return None, reshaped, pooled
        node = node.outputs[0]
        if isinstance(node.module, (nn.Linear,) + _CONV):
            return node.module, reshaped, pooled
        if _linear_core(node) is not None:
            return _linear_core(node), reshaped, pooled
        if node.type == ops.OPTYPE.RESHAPE:
            reshaped = True
            continue
        if _op_in(node, _FOLD_PATH_OPS) and len(node.inputs) == 1:
            pooled = pooled or _op_name(node) not in ("relu", "leakyrelu", "clone", "nativedropout")
            continue
        return None, reshaped, pooled


def _check_no_sample_sites(body: nn.Module, example_input: torch.Tensor) -> None:
    import pyro.poutine as poutine

    with torch.no_grad():
        trace = poutine.trace(body).get_trace(example_input)
    sites = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    if sites:
        raise ValueError(
            f"the network declares Pyro sample sites {sites} besides its noise layers; compact a "
            "backbone mapping x -> output (for a NoisyClassifier, compact the classifier itself)"
        )


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return int(counter.get_total_flops())


def compact(
    model: nn.Module,
    guide: Any = None,
    *,
    example_input: Optional[torch.Tensor] = None,
    method: str = "auto",
) -> CompactModel:
    """A plain network computing the masked model's ``"mean"``-mode output, pruned structures gone.

    Args:
        model: a :class:`~bmrs_pyro.nn.NoisyClassifier` (its ``net`` is compacted) or an
            ``nn.Module`` mapping x -> output whose only Pyro statements are noise layers.
        guide: the fitted guide (e.g. ``AutoTruncatedLogNormal``) giving E_q[theta]; by default
            each noise layer's attached guide (:meth:`MultiplicativeNoise.posterior_mean`).
        example_input: a batch for the network; needed for FLOPs and by the graph engine (tracing).
        method: ``"sequential"`` (an ``nn.Sequential`` walked in order), ``"graph"``
            (Torch-Pruning's dependency graph, any traceable network) or ``"auto"`` (sequential
            when the network is a supported ``nn.Sequential``, else graph).

    Returns a :class:`CompactModel` in eval mode; see the module docstring for what is removed,
    how residual groups are handled and what happens to a layer pruned to zero width.

    Raises:
        ValueError: no E[theta] available, Bayesian weights, an unsupported network without
            ``example_input``, or an unknown ``method``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    net = _backbone(model)
    _check_deterministic(net)
    if example_input is not None and not torch.is_tensor(example_input):
        raise ValueError(f"example_input must be a tensor batch, got {type(example_input).__name__}")
    means = _posterior_means(net, guide)
    reason = None
    body: Optional[nn.Module] = None
    used = method
    if method in ("auto", "sequential"):
        engine = _SequentialCompactor(means)
        try:
            if not isinstance(net, nn.Sequential):
                raise _Unsupported(f"the network is a {type(net).__name__}, not an nn.Sequential")
            body = engine.run(net)
            used = "sequential"
        except _Unsupported as err:
            if method == "sequential":
                raise ValueError(f"sequential compaction is not possible: {err}; use method='graph'") from None
            reason = str(err)
    if body is None:
        if example_input is None:
            raise ValueError(
                f"compacting this network needs example_input (a batch) so that Torch-Pruning can "
                f"trace it ({reason or 'method=graph'})"
            )
        engine = _GraphCompactor(means)
        body = engine.run(net, example_input)
        used = "graph"
    body.eval()
    stats = _stats(net, body, example_input, engine.layers, engine.notes, used, means)
    return CompactModel(body, stats).eval()


def _stats(net, body, example_input, layers, notes, method, means) -> dict:
    params_before, params_after = _count_params(net), _count_params(body)
    flops_before = flops_after = diff = None
    if example_input is not None:
        was_training = net.training
        net.eval()
        try:
            with noise_mode(net, "mean"), torch.no_grad():
                reference = net(example_input)
        finally:
            net.train(was_training)
        # Counted on the Pyro-free copy: in mean mode each noise layer would recompute E[theta]
        # from the guide under the counter (slow, and not part of the network's cost).
        flops_before = _flops(_dense_copy(net, means)[0], example_input)
        flops_after = _flops(body, example_input)
        with torch.no_grad():
            diff = float((body(example_input) - reference).abs().max())
    return {
        "method": method,
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before if params_before else math.nan,
        "flops_before": flops_before,
        "flops_after": flops_after,
        "flops_ratio": (flops_after / flops_before) if flops_before else None,
        "layers": layers,
        "max_abs_diff": diff,
        "notes": list(notes),
    }


def masked_dense(model: nn.Module, guide: Any = None) -> nn.Module:
    """The masked network before compaction, without Pyro: a copy of the backbone in eval mode
    whose noise layers are replaced by ``Scale(E[theta] * mask)`` (full width).

    It computes the same function as the backbone in ``"mean"`` mode and is the fair dense
    baseline for latency: no structure removed, no guide evaluated at every call.
    """
    net = _backbone(model)
    _check_deterministic(net)
    return _dense_copy(net, _posterior_means(net, guide))[0]


def compression_stats(
    model: nn.Module, guide: Any = None, *, example_input: Optional[torch.Tensor] = None, method: str = "auto"
) -> dict:
    """The ``stats`` dict of :func:`compact` (parameters and FLOPs before/after, kept widths)."""
    return compact(model, guide, example_input=example_input, method=method).stats
