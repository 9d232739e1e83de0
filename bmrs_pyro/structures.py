"""The network around each noise layer (:func:`structure_map`: producer, norm, consumers) and the two
criteria that read weights or activations through it (:func:`l2_score`, :func:`activation_score`)."""

from __future__ import annotations


import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import pyro
import pyro.poutine as poutine
import torch
from torch import nn
from torch.utils.data import DataLoader

from .nn import MultiplicativeNoise, noise_mode, noise_modules


#: Layers whose output channels can be structures (groups=1 convolutions only).
PRODUCER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class StructureLinks:
    """The layers around one noise layer in a feed-forward (Sequential-style) network.

    ``producer`` is the Linear/Conv whose output channels are the structures (its output rows /
    filters), ``norms`` the BatchNorm layers between it and the noise layer, ``consumer`` the next
    Linear/Conv reading them and ``columns_per_structure`` how many of the consumer's input columns
    each structure owns (1, or H*W after a conv -> flatten -> linear transition).
    """

    site: str
    layer: MultiplicativeNoise
    producer_name: Optional[str] = None
    producer: Optional[nn.Module] = None
    norms: list = field(default_factory=list)
    consumer_name: Optional[str] = None
    consumer: Optional[nn.Module] = None
    columns_per_structure: int = 1


def _out_channels(module: nn.Module) -> Optional[int]:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        return module.out_channels
    return None


def _in_channels(module: nn.Module) -> Optional[int]:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
        return module.in_channels
    return None


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, MultiplicativeNoise) or not any(True for _ in m.children())
    ]


def _rows(args: tuple, kwargs: dict, n: int) -> tuple[tuple, dict]:
    size = None
    for v in list(args) + list(kwargs.values()):
        if torch.is_tensor(v) and v.dim() >= 1:
            size = v.shape[0]
            break

    def cut(v):
        return v[:n] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == size else v

    return tuple(cut(v) for v in args), {k: cut(v) for k, v in kwargs.items()}


def example_input(model: nn.Module, guide=None, data=None) -> Optional[tuple[tuple, dict]]:
    """A small input batch ``(args, kwargs)`` for tracing ``model``, or None if none is known.

    Taken from ``data`` (``(X, y)``, ``X`` or a DataLoader), else from the inputs the guide saw when
    it first ran (its prototype trace), found through ``guide`` or the noise layers' attached guide.
    """
    if data is not None:
        x = _first_input(data)
        return (x[:2],), {}
    guides = [guide] if guide is not None else []
    for layer in noise_modules(model).values():
        ref = layer._guide() if layer._guide is not None else None
        if ref is not None:
            guides.append(ref)
    for g in guides:
        trace = getattr(g, "prototype_trace", None)
        if trace is not None and "_INPUT" in trace.nodes:
            node = trace.nodes["_INPUT"]
            return _rows(tuple(node["args"]), dict(node["kwargs"]), 2)
    return None


@contextlib.contextmanager
def _quiet_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm uses running stats and keeps them), no grad, no Pyro side effects."""
    training = {m: m.training for m in model.modules()}
    rng = pyro.util.get_rng_state()
    model.eval()
    try:
        with torch.no_grad(), poutine.block():
            yield
    finally:
        for m, t in training.items():
            m.training = t
        pyro.util.set_rng_state(rng)


def _execution_order(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, nn.Module, tuple]]:
    calls: list = []
    seen: set = set()
    handles = []
    for name, module in _leaves(model):
        def hook(mod, inputs, output, name=name):
            if id(mod) not in seen and torch.is_tensor(output):
                seen.add(id(mod))
                calls.append((name, mod, tuple(output.shape)))

        handles.append(module.register_forward_hook(hook))
    try:
        # Sample mode draws theta from the prior, so no guide is needed just to see the order.
        with _quiet_eval(model), noise_mode(model, "sample"):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def structure_map(model: nn.Module, inputs: Optional[tuple[tuple, dict]] = None) -> dict[str, StructureLinks]:
    """For every noise site, the layer producing its structures and the layer consuming them.

    With ``inputs`` (``(args, kwargs)`` for ``model``, see :func:`example_input`) the modules are
    ordered by a traced forward pass, which is right whatever order they were registered in;
    otherwise by ``model.named_modules()``, which is right for Sequential-style backbones. The
    producer is the last Linear/Conv (groups=1) before the noise layer with as many outputs as the
    layer has structures; the consumer is the first Linear/Conv after it whose inputs are a
    multiple of them. Residual connections are not followed.
    """
    layers = noise_modules(model)
    if inputs is not None:
        order = [(name, mod) for name, mod, _ in _execution_order(model, *inputs)]
    else:
        order = _leaves(model)
    position = {id(mod): i for i, (_, mod) in enumerate(order)}
    links = {}
    for site, layer in layers.items():
        link = StructureLinks(site, layer)
        links[site] = link
        if id(layer) not in position:
            continue
        at = position[id(layer)]
        s = layer.num_structures
        for i in range(at - 1, -1, -1):
            name, mod = order[i]
            if isinstance(mod, NORM_TYPES) and mod.num_features == s:
                link.norms.append((name, mod))
            if isinstance(mod, PRODUCER_TYPES):
                # the nearest Linear/Conv upstream; it produces the structures only if it fits
                if _out_channels(mod) == s:
                    link.producer_name, link.producer = name, mod
                break
        if link.producer is None:
            link.norms = []
        for name, mod in order[at + 1 :]:
            if not isinstance(mod, PRODUCER_TYPES):
                continue
            n_in = _in_channels(mod)
            if n_in is None:  # grouped convolution: not handled
                break
            # n_in == s, or a Linear after flattening (C, H, W) maps channel-major: H*W columns each
            flattened = isinstance(mod, nn.Linear) and layer.channel_dim != -1 and n_in % s == 0
            if n_in == s or flattened:
                link.consumer_name, link.consumer = name, mod
                link.columns_per_structure = n_in // s
            break
    return links


def l2_score(model, guide, site, layer, *, data=None) -> torch.Tensor:
    """L2 norm of the weights into each structure (the BMRS paper's weight-norm baseline).

    For a Linear producer the norm of its output row, for a Conv the norm of its output filter
    over input channels and kernel; the bias is not included. The producer is the Linear/Conv
    feeding the noise layer (:func:`structure_map`). Higher = more important. Wright, Igel &
    Selvan, NeurIPS 2024; the classic magnitude criterion of Li et al., "Pruning Filters for
    Efficient ConvNets", ICLR 2017 (there with the L1 norm).
    """
    links = structure_map(model, example_input(model, guide, data))
    producer = links[site].producer
    if producer is None:
        raise ValueError(
            f"l2: found no Linear/Conv layer with {layer.num_structures} outputs feeding {site}; "
            "the L2 criterion needs the noise layer to follow one (Linear -> act -> noise)"
        )
    return weight_norm(producer.weight)


def weight_norm(weight: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """The L``p`` norm of each output row / filter of a Linear or Conv weight (float64): the score
    of the weight-magnitude criteria (``l2`` here, the iterative baselines' L1)."""
    w = weight.detach().to(torch.float64)
    return w.reshape(w.shape[0], -1).norm(p=p, dim=1)


def mean_abs_activation(layers: Mapping[str, MultiplicativeNoise], run: Callable[[], Any]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per site, the mean |output| of each structure of its noise layer over what ``run()`` feeds
    the network (examples and positions), and the number of rows averaged (0 if never reached)."""
    totals = {site: torch.zeros(layer.num_structures, dtype=torch.float64) for site, layer in layers.items()}
    counts = {site: 0 for site in layers}

    def hook_for(site: str):
        def hook(mod, inputs, output):
            dim = mod.channel_dim if mod.channel_dim > 0 else output.dim() + mod.channel_dim
            a = output.detach().abs().to(torch.float64).movedim(dim, -1).reshape(-1, mod.num_structures)
            totals[site] += a.sum(0).cpu()
            counts[site] += a.shape[0]
        return hook

    handles = [layer.register_forward_hook(hook_for(site)) for site, layer in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {site: totals[site] / max(counts[site], 1) for site in layers}, counts


def _first_input(data) -> torch.Tensor:
    if torch.is_tensor(data):
        return data
    if isinstance(data, DataLoader):
        batch = next(iter(data))
        return batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(data, (tuple, list)) and data and torch.is_tensor(data[0]):
        return data[0]
    raise ValueError(f"data must be (X, y), X or a DataLoader, got {type(data).__name__}")


def _input_batches(data, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, DataLoader):
        for batch in data:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch
        return
    x = _first_input(data)
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


def activation_score(model, guide, site, layer, *, data=None, batch_size=1024) -> torch.Tensor:
    """Mean |activation| of each structure after the noise layer, in mean mode, over ``data``.

    The activation-based criterion of Zhao, Jain & Zhao, "Iterative Activation-based Structured
    Pruning" (IAP/AIAP), 2022: average the absolute output of each unit/channel over the
    examples (and spatial positions). The network runs deterministically (theta = E_q[theta] *
    mask, BatchNorm in eval mode). Higher = more important.
    """
    if data is None:
        raise ValueError("the activation criterion needs data: pass data=(X, y) (training data)")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    def run() -> None:
        with _quiet_eval(model), noise_mode(model, "mean"):
            for x in _input_batches(data, batch_size):
                model(x)

    means, counts = mean_abs_activation({site: layer}, run)
    if counts[site] == 0:
        raise ValueError(f"activation: {site} was never reached by the data (is data empty?)")
    return means[site]
