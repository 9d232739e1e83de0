"""Data-parallel SVI on ``torch.distributed`` (issue 14).

Nothing here communicates by itself: every exchange is a ``torch.distributed`` collective
(``all_reduce``, ``broadcast``, ``broadcast_object_list``) on a process group that the caller
(``torchrun``, or :func:`init_from_env`) has initialised, with the gloo backend on CPU or NCCL
on CUDA.

How :func:`bmrs_pyro.fit` uses it when a process group of more than one rank is active (or when
it is given a :class:`DataParallel` / a ``ProcessGroup``):

- ``batch_size`` is the **global** minibatch; each of the W ranks takes ``batch_size / W``
  examples per step. Every rank shuffles with the same generator (same seed), and
  ``torch.utils.data.DistributedSampler`` (``shuffle=False``) hands each rank its strided share
  of that order, so the union of the ranks' k-th minibatches is the k-th minibatch of the
  single-process run with the global batch. (When N is not a multiple of W the sampler pads
  the order with its first W - 1 examples or fewer, as ``DistributedSampler`` always does.)
- Each rank computes ``-(N / B_local) sum_local log p + kl_weight * KL``; averaging these
  gradients over ranks (one ``all_reduce`` of all gradients plus the loss per step, divided by
  W) gives exactly the gradient of ``-(N / B_global) sum_global log p + kl_weight * KL``: the KL
  is counted once, the likelihood with the global batch.
- The noise: by default (``independent_noise=True``) rank r > 0 reseeds torch's generator at the
  start of every epoch from ``(seed, epoch, rank)``, so ranks draw independent noise and a resume
  with the same number of ranks continues the same streams (rank 0 continues the checkpointed
  state). ``independent_noise=False`` keeps every rank on the same stream (the tests use it with
  ``noise="global"`` to compare 2 ranks x 64 with 1 process x 128 exactly).
- Continuous pruning is decided on rank 0 only and its masks (and event) broadcast, so every rank
  holds the same masks (:func:`decide_on_rank0`). The initial parameters are broadcast from rank 0
  too, so ranks cannot start apart.
- Files: only rank 0 writes (:func:`is_writer`); ``bmrs run`` under ``torchrun`` runs the whole
  run on rank 0 and :func:`bmrs_pyro.launch.follow_run` (training, reductions and fine-tuning, no files) elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .nn import noise_modules

__all__ = ["DataParallel", "resolve", "init_from_env", "is_writer", "decide_on_rank0"]


@dataclass
class DataParallel:
    """A data-parallel set-up for :func:`bmrs_pyro.fit`: the process group (None: the default
    group) and whether ranks draw independent noise (see the module docstring)."""

    group: Any = None
    independent_noise: bool = True

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        """Number of ranks in the group."""
        return dist.get_world_size(self.group)

    def local_batch(self, batch_size: int) -> int:
        """Each rank's share of the global ``batch_size``; ValueError unless W divides it."""
        w = self.world_size
        if batch_size % w:
            raise ValueError(f"batch_size {batch_size} is the global minibatch and must be a multiple of the "
                             f"{w} ranks (each rank takes batch_size / {w}); pick e.g. {max(w, batch_size - batch_size % w)}")
        return batch_size // w

    def shard(self, order: torch.Tensor) -> torch.Tensor:
        """This rank's strided share of the shuffled index ``order`` (``DistributedSampler``)."""
        sampler = DistributedSampler(range(len(order)), num_replicas=self.world_size, rank=self.rank,
                                     shuffle=False, drop_last=False)
        return order[torch.as_tensor(list(iter(sampler)), dtype=torch.long)]

    def seed_noise(self, seed: int, epoch: int) -> None:
        """Rank r > 0: reseed torch's generator from (seed, epoch, rank) for independent noise."""
        if self.independent_noise and self.rank > 0:
            torch.manual_seed((seed * 1_000_003 + epoch * 8191 + self.rank * 131_071) % (2 ** 63))

    def broadcast_parameters(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's values of ``tensors`` (parameters, buffers) to every rank."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=src, group=self.group)

    def average_gradients(self, params: Sequence[torch.Tensor], loss: torch.Tensor) -> float:
        """One ``all_reduce`` of every gradient and the loss, divided by W; returns the mean loss.

        Parameters without a gradient on this rank (e.g. the variational parameters during the
        deterministic warm start) are left out; every rank runs the same code, so every rank
        leaves out the same ones.
        """
        with_grad = [p for p in params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in with_grad] + [loss.detach().reshape(1).to(
            with_grad[0].grad if with_grad else loss)]) if with_grad else loss.detach().reshape(1).clone()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat /= self.world_size
        offset = 0
        for p in with_grad:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
        return float(flat[-1].item())


def resolve(distributed: Any) -> Optional[DataParallel]:
    """What ``fit(distributed=...)`` means: None detects an initialised process group of more than
    one rank, False turns data parallelism off, a ``ProcessGroup`` or :class:`DataParallel` is used
    as given. Raises ValueError for anything else or a group that is not initialised."""
    if distributed is False:
        return None
    if distributed is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return DataParallel()
        return None
    if isinstance(distributed, DataParallel):
        dp = distributed
    elif dist.is_available() and isinstance(distributed, dist.ProcessGroup):
        dp = DataParallel(group=distributed)
    else:
        raise ValueError(f"distributed must be None (detect), False, a torch.distributed ProcessGroup or a "
                         f"bmrs_pyro.distributed.DataParallel, got {type(distributed).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed training needs an initialised process group: run under torchrun, or call "
                         "torch.distributed.init_process_group (or bmrs_pyro.distributed.init_from_env) first")
    return dp


def is_writer() -> bool:
    """True on rank 0 of the default group, and in a process that is not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_from_env(device: str = "cpu") -> Optional[str]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), initialise the default process
    group -- NCCL for a CUDA ``device``, gloo otherwise -- and return this rank's device
    (``cuda:<LOCAL_RANK>`` for ``"cuda"``); without torchrun return None and do nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if device == "cuda" else device
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def decide_on_rank0(model: torch.nn.Module, decide: Callable[[], Any], dp: Optional[DataParallel] = None,
                    *, share: bool = True) -> Any:
    """Run ``decide()`` (a reduction that sets the noise layers' masks) on rank 0 only, then give
    every rank rank 0's masks and, with ``share``, its return value (``broadcast_object_list``; it
    must pickle; without ``share`` the other ranks get None). Without a process group it simply
    calls ``decide()``."""
    dp = dp if dp is not None else resolve(None)
    if dp is None:
        return decide()
    value = decide() if dp.rank == 0 else None
    layers = noise_modules(model)
    dp.broadcast_parameters([layers[s].mask for s in layers])
    if not share:
        return value
    box = [value]
    src = dist.get_global_rank(dp.group, 0) if dp.group is not None else 0
    dist.broadcast_object_list(box, src=src, group=dp.group)
    return box[0]
