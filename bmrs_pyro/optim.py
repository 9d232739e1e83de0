"""The optimiser of training and the one helper that holds pruned structures still.

``fit`` (SVI and its deterministic warm start) and the deterministic baselines share
:func:`adam`; :func:`freeze_pruned` is the single place that keeps the variational parameters of
masked structures where pruning left them (values restored after each step, Adam's first
moment zeroed), whether the mask was set by continuous pruning, before a resume or by hand.
"""

from __future__ import annotations

from typing import Optional

import torch

from .guides import find_noise_guide, raw_param
from .nn import noise_modules


def trainable_parameters(model, guide, param_trace=None) -> list:
    """Module parameters of model and guide, plus any bare ``pyro.param`` sites they use
    (``param_trace``: a ``poutine.trace(param_only=True)`` trace of one loss evaluation)."""
    candidates = []
    for module in (model, guide):
        if isinstance(module, torch.nn.Module):
            candidates += list(module.parameters())
    if param_trace is not None:
        for site in param_trace.nodes.values():
            value = site["value"]
            candidates.append(value.unconstrained() if hasattr(value, "unconstrained") else value)
    seen, params = set(), []
    for p in candidates:
        if p.requires_grad and p.is_leaf and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def param_groups(params: list, guide, lr: float, guide_lr: Optional[float]) -> list:
    """One Adam group, or two when the variational parameters get their own learning rate."""
    if guide_lr is None or not isinstance(guide, torch.nn.Module):
        return [{"params": params, "lr": lr}]
    variational = {id(p) for p in guide.parameters()}
    groups = [{"params": [p for p in params if id(p) not in variational], "lr": lr},
              {"params": [p for p in params if id(p) in variational], "lr": guide_lr}]
    return [g for g in groups if g["params"]]


def adam(groups: list) -> torch.optim.Adam:
    """Adam with the fused update (one kernel per parameter, CPU and CUDA) where every parameter
    allows it, else the multi-tensor (``foreach``) one: the same algorithm and hyperparameters
    as ``torch.optim.Adam``'s default per-tensor loop, a few operations per step instead of ~10
    per parameter. ``groups``: parameter groups or a list of parameters."""
    groups = list(groups)
    params = [p for g in groups for p in g["params"]] if groups and isinstance(groups[0], dict) else groups
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(groups, fused=True) if fusable else torch.optim.Adam(groups, foreach=True)


class FrozenStructures:
    """The variational parameters of pruned structures, held at their values (see
    :func:`freeze_pruned`). ``restore()`` writes them back after an optimiser step."""

    def __init__(self, entries: list) -> None:
        self.entries = entries  # (raw parameter, bool mask of pruned entries, their values)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def restore(self) -> None:
        """Put the held values back (call after every optimiser step)."""
        with torch.no_grad():
            for p, dead, values in self.entries:
                p[dead] = values


def freeze_pruned(model, guide, optimizer: Optional[torch.optim.Optimizer] = None) -> FrozenStructures:
    """Hold the variational parameters (loc, log scale) of every masked structure where they are.

    Pruned structures get exactly zero gradient (masked likelihood and KL); zeroing Adam's first
    moment for them (when ``optimizer`` has state) stops momentum from carrying them, and
    :meth:`FrozenStructures.restore` after each step keeps them bit-for-bit. Returns an empty
    holder when the model has no noise layer or the guide has not run yet.
    """
    entries = []
    noise_guide = find_noise_guide(guide)  # also inside an AutoGuideList
    if not isinstance(model, torch.nn.Module) or noise_guide is None or noise_guide.prototype_trace is None:
        return FrozenStructures(entries)
    for name, layer in noise_modules(model).items():
        dead = ~layer.mask.bool()
        if name not in noise_guide.site_names or not dead.any():
            continue
        for store in (noise_guide.locs, noise_guide.log_scales):
            p = raw_param(store, name)
            entries.append((p, dead, p.detach()[dead].clone()))
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            if "exp_avg" in state:
                with torch.no_grad():
                    state["exp_avg"][dead.to(state["exp_avg"].device)] = 0.0
    return FrozenStructures(entries)

