"""Callbacks of :func:`bmrs_pyro.infer.fit`: what happens between epochs, outside the training loop.

A callback is any callable ``callback(epoch, history, model, guide) -> bool | None`` called after
every epoch (``epoch`` 0-based, counted from the start of training across resumes); returning
True stops training. A callback may also have a ``begin(**context)`` method, which ``fit`` calls
once before the first epoch with ``train_data``, ``start_epoch``, ``epochs`` and
``warm_start_epochs``. Training itself knows nothing about pruning: continuous pruning is the
callback :class:`PruneEvery`, and ``fit`` only holds whatever is masked still
(:func:`bmrs_pyro.optim.freeze_pruned`).
"""

from __future__ import annotations

import math
from typing import Optional

from .criteria import get_criterion
from .distributed import decide_on_rank0
from .pruner import guarded_reduce, prune_event

#: Share of the SVI epochs of a ``fit`` call with continuous pruning that pass before the first
#: reduction: posteriors start wherever they were initialised (near the prior, possibly) and BMR
#: can only tell needed from unneeded structures once the data have moved them.
DEFAULT_PRUNE_WARMUP = 0.25

#: Keyword arguments of a continuous-pruning step that are not the criterion's own options.
_REDUCE_ARGUMENTS = ("fraction", "scope", "respect_mask", "min_keep", "joint_check")


def check_prune_options(method: str, options: dict) -> None:
    """Refuse an unknown method or option before the first step, not at the first reduction."""
    criterion = get_criterion(method)
    criterion.check_options({k: v for k, v in options.items() if k not in _REDUCE_ARGUMENTS})
    if not criterion.has_rule and options.get("fraction") is None:
        raise ValueError(f"continuous pruning with {method!r} needs prune_options={{'fraction': ...}}: "
                         "it ranks structures but has no threshold of its own")


def _check_epoch(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an epoch number >= 1, got {value!r}")


class PruneEvery:
    """Continuous pruning: :func:`bmrs_pyro.pruner.guarded_reduce` every ``every`` epochs.

    ``fit(..., callbacks=[PruneEvery(5, "bmrs_n")])``; ``fit(..., prune_every=5)`` builds the same.
    The first reduction follows epoch ``start`` (counted from the start of training, like
    ``fit``'s ``start_epoch``), then every ``every`` epochs; default ``start``: the end of the
    deterministic warm start plus a quarter of the SVI epochs (:data:`DEFAULT_PRUNE_WARMUP`), at
    least one. No reduction happens in the warm start. ``options``: the reduction's options
    (``margin``, ``bits``, ``fraction``, ``min_keep`` (default 1: never empty a layer),
    ``joint_check`` (default True: hold a BMRS reduction to its margin jointly on the training
    data, :func:`bmrs_pyro.pruner.check_jointly`)). Each reduction appends a ``"prune"`` event to
    the history; ``fit`` then holds the pruned structures' variational parameters.
    ``data``: the training data of the joint check (default: ``fit``'s ``train_data``).
    """

    def __init__(self, every: int, method: str = "bmrs_n", options: Optional[dict] = None, *,
                 start: Optional[int] = None, data=None) -> None:
        _check_epoch("prune_every", every)
        if start is not None:
            _check_epoch("prune_start", start)
        self.every, self.method, self.options = every, method, dict(options or {})
        check_prune_options(method, self.options)
        self.start, self.data = start, data
        self._warm_end = 0
        self._distributed = None

    def begin(self, *, train_data, start_epoch: int, epochs: int, warm_start_epochs: int = 0, distributed=None,
              **_) -> None:
        """Resolve the default start and data from ``fit``'s arguments (and, under data
        parallelism, decide each reduction on rank 0 and broadcast it)."""
        self._warm_end = start_epoch + warm_start_epochs
        self._distributed = distributed
        if self.start is None:
            self.start = self._warm_end + max(1, math.ceil(DEFAULT_PRUNE_WARMUP * (epochs - warm_start_epochs)))
        if self.data is None:
            self.data = train_data

    def due(self, done: int) -> bool:
        """Whether a reduction follows the ``done``-th epoch: at ``start``, then every ``every``."""
        return done > self._warm_end and done >= self.start and (done - self.start) % self.every == 0

    def __call__(self, epoch: int, history, model, guide) -> bool:
        if self.start is None:
            raise RuntimeError("PruneEvery needs begin() (fit calls it) or an explicit start and data")
        if self.due(epoch + 1):
            def decide():
                return prune_event(guarded_reduce(model, guide, self.method, self.data, **self.options).apply(), epoch)

            if self._distributed is not None:  # decided on rank 0, masks and event broadcast
                history.events.append(decide_on_rank0(model, decide, self._distributed))
            else:
                history.events.append(decide())
        return False
