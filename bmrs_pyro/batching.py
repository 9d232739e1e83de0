"""Minibatches from in-memory tensors or a DataLoader, and the argument checks training shares."""

from __future__ import annotations

import math
from typing import Union

import torch
from torch.utils.data import DataLoader

from .checks import InputError

Data = Union[tuple, DataLoader]


def as_tensors(data: Data, name: str):
    """``data`` checked as a pair (X, y) of tensors with one label per example, or a DataLoader
    (returned as is). Raises :class:`~bmrs_pyro.checks.InputError` otherwise."""
    if isinstance(data, DataLoader):
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InputError(f"{name} must be a tuple (X, y) of tensors or a DataLoader, got {type(data).__name__}")
    x, y = data
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise InputError(f"{name} must hold tensors, got ({type(x).__name__}, {type(y).__name__})")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{name}: X has {x.shape[0]} rows but y has {y.shape[0]}; pass one label per example")
    if x.shape[0] == 0:
        raise InputError(f"{name} is empty (0 examples); pass at least one example")
    return x, y


def iterate_batches(data: Data, batch_size: int, *, shuffle: bool, generator=None, device="cpu", shard=None):
    """Yield (x, y) minibatches from a tensor pair (sliced by index, in the order of one
    ``randperm`` per call when ``shuffle``) or a DataLoader (its own order and batch size).

    ``shard`` (data-parallel training): a function taking the epoch's index order to this rank's
    share of it (:meth:`bmrs_pyro.distributed.DataParallel.shard`)."""
    if isinstance(data, DataLoader):
        for x, y in data:
            yield x.to(device), y.to(device)
        return
    x, y = data
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if shard is not None:  # this rank's DistributedSampler share of the same order
        order = shard(order)
        n = len(order)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx].to(device), y[idx].to(device)


def dataset_size(data: Data) -> int:
    """Number of examples of a tensor pair or a DataLoader's data set."""
    if isinstance(data, DataLoader):
        return len(data.dataset)
    return data[0].shape[0]


def num_batches(data: Data, batch_size: int, shard=None) -> int:
    """Minibatches per epoch (of this rank's share with ``shard``)."""
    if isinstance(data, DataLoader):
        return len(data)
    n = data[0].shape[0] if shard is None else len(shard(torch.arange(data[0].shape[0])))
    return math.ceil(n / batch_size)


def check_positive(name: str, value, kind=float) -> None:
    """ValueError unless ``value`` is a finite number > 0 (an integer when ``kind`` is int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if kind is int and int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
