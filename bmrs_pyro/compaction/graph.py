"""The graph engine: any traceable network through Torch-Pruning's ``DependencyGraph``, with coupled
channels removed group by group (``method="graph"``); see :mod:`bmrs_pyro.compaction`."""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import pyro.poutine as poutine
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from ..nn import MultiplicativeNoise
from .common import _BATCHNORM, _CONV, Scale, _expand, _set_submodule, _take_in, _take_out


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
    with torch.no_grad():
        trace = poutine.trace(body).get_trace(example_input)
    sites = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    if sites:
        raise ValueError(
            f"the network declares Pyro sample sites {sites} besides its noise layers; compact a "
            "backbone mapping x -> output (for a NoisyClassifier, compact the classifier itself)"
        )
