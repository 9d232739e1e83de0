"""The public entry points of compaction: :func:`compact`, :func:`masked_dense`, :func:`compression_stats`."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..nn import noise_mode
from .common import CompactModel, _backbone, _check_deterministic, _count_params, _flops, _posterior_means, _Unsupported
from .graph import _GraphCompactor, _dense_copy
from .network_part import NetworkPart, observation_sites
from .sequential import _SequentialCompactor

#: The compaction engines ``compact(method=...)`` accepts (was ``METHODS``).
ENGINES = ("auto", "sequential", "graph")


def compact(
    model: nn.Module,
    guide: Any = None,
    *,
    example_input: Optional[torch.Tensor] = None,
    method: str = "auto",
) -> CompactModel:
    """A plain network computing the masked model's ``"mean"``-mode output, pruned structures gone.

    Args:
        model: a :class:`~bmrs_pyro.nn.NoisyClassifier` (its ``net`` is compacted), an
            ``nn.Module`` mapping x -> output whose only Pyro statements are noise layers, or a
            hand-written Pyro model whose ``forward(x)`` returns the network's output and also
            declares a data plate and observation sites: given ``example_input``, its network
            part is compacted (:class:`~bmrs_pyro.compaction.network_part.NetworkPart`: the
            observation statements are silenced, nothing is sampled).
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
    if method not in ENGINES:
        raise ValueError(f"method must be one of {ENGINES}, got {method!r}")
    net = _backbone(model)
    _check_deterministic(net)
    if example_input is not None and not torch.is_tensor(example_input):
        raise ValueError(f"example_input must be a tensor batch, got {type(example_input).__name__}")
    if example_input is not None and not isinstance(net, nn.Sequential) and observation_sites(net, example_input):
        # A hand-written model (data plate, ``obs``): compact the network part x -> forward(x).
        net = NetworkPart(net)
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
