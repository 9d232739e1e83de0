"""Tests for bmrs_pyro.data: offline loaders, file formats, splits and error messages."""

from __future__ import annotations

import gzip
import pickle
import socket
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the fixture writers live beside this file
from _fixtures_data import (CIFAR_NAMES, IDX_NAMES, idx_bytes, mnist_arrays,  # noqa: E402
                            write_cifar, write_idx, write_mnist)

from bmrs_pyro import data  # noqa: E402
from bmrs_pyro.data import DATASETS, DataSplits, load  # noqa: E402


def _ids(X: torch.Tensor) -> list[int]:
    """Row ids stored in pixel (0, 0) of the IDX fixtures."""
    return [round(v * 255) for v in X[:, 0, 0, 0].tolist()]


# ----------------------------------------------------------------------------- API surface

def test_dataset_names_and_unknown_name():
    assert DATASETS == ("digits", "mnist1d", "teacher_student", "mnist5k", "mnist", "fashion_mnist", "cifar10")
    with pytest.raises(ValueError) as err:
        load("imagenet")
    for name in DATASETS:
        assert name in str(err.value)


def test_unsupported_option_names_accepted_ones():
    with pytest.raises(ValueError) as err:
        load("digits", teacher_width=3)
    msg = str(err.value)
    assert "teacher_width" in msg and "test_fraction" in msg and "normalize" in msg and "subset" in msg
    with pytest.raises(ValueError, match="num_samples"):
        load("mnist", root="/nonexistent", num_samples=10)


@pytest.mark.parametrize("kwargs", [
    {"val_fraction": 1.0}, {"val_fraction": -0.1}, {"val_fraction": "0.2"}, {"seed": -1}, {"seed": 1.5},
    {"subset": 0}, {"subset": True}, {"normalize": "yes"}, {"test_fraction": 0.0}, {"test_fraction": 1.0},
])
def test_bad_option_values(kwargs):
    with pytest.raises(ValueError):
        load("digits", **kwargs)


@pytest.mark.parametrize("kwargs", [{"teacher_width": 0}, {"num_classes": 1}, {"in_dim": 2.0}, {"num_samples": 1}])
def test_bad_teacher_options(kwargs):
    with pytest.raises(ValueError):
        load("teacher_student", **kwargs)


# ----------------------------------------------------------------------------- digits and splits

def test_digits_values_shapes_and_split_sizes():
    from sklearn.datasets import load_digits

    d = load("digits")
    assert isinstance(d, DataSplits) and d.name == "digits" and d.num_classes == 10
    assert d.input_shape == (1, 8, 8) and d.num_features == 64
    # 1797 examples: round(0.2 * 1797) = 359 test, round(0.2 * 1438) = 288 validation.
    assert [len(s[1]) for s in (d.train, d.val, d.test)] == [1150, 288, 359]
    for X, y in (d.train, d.val, d.test):
        assert X.dtype == torch.float32 and y.dtype == torch.int64 and X.shape[1:] == (1, 8, 8)
    X_all = torch.cat([d.train[0], d.val[0], d.test[0]]).reshape(-1, 64).numpy()
    y_all = torch.cat([d.train[1], d.val[1], d.test[1]]).numpy()
    assert X_all.min() == 0.0 and X_all.max() == 1.0
    # The three splits together are exactly sklearn's examples, scaled by 1/16, with their labels.
    ref = load_digits()
    ref_rows = sorted(zip(map(tuple, (ref.data / 16.0).astype(np.float32)), ref.target.tolist()))
    got_rows = sorted(zip(map(tuple, X_all), y_all.tolist()))
    assert got_rows == ref_rows


def test_split_order_train_shuffled_test_in_source_order():
    from sklearn.datasets import load_digits

    d = load("digits")
    y = d.train[1]
    changes = int((y[1:] != y[:-1]).sum())
    assert changes > 0.8 * len(y)  # class-grouped order would give 9 changes
    first_index: dict[bytes, int] = {}
    for i, row in enumerate((load_digits().data / 16.0).astype(np.float32)):
        first_index.setdefault(row.tobytes(), i)
    order = [first_index[row.tobytes()] for row in d.test[0].reshape(-1, 64).numpy()]
    assert order == sorted(order)


def test_splits_are_stratified():
    d = load("digits", seed=3)
    pool = Counter(torch.cat([d.train[1], d.val[1]]).tolist())
    val = Counter(d.val[1].tolist())
    for cls, n in pool.items():
        assert abs(val[cls] - 0.2 * n) <= 1.0
    full = Counter(pool) + Counter(d.test[1].tolist())
    test = Counter(d.test[1].tolist())
    for cls, n in full.items():
        assert abs(test[cls] - 0.2 * n) <= 1.0


def test_seed_reproducible_and_different_seed_differs():
    a, b, c = load("digits", seed=5), load("digits", seed=5), load("digits", seed=6)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split)[0], getattr(b, split)[0])
        assert torch.equal(getattr(a, split)[1], getattr(b, split)[1])
    assert not torch.equal(a.val[0], c.val[0])
    # Validation rows differ as a set, not just in order.
    as_set = lambda X: {tuple(r) for r in X.reshape(len(X), -1).tolist()}  # noqa: E731
    assert as_set(a.val[0]) != as_set(c.val[0])
    # The held-out test split is fixed so that scores from different seeds are comparable.
    assert torch.equal(a.test[0], c.test[0])


def test_val_fraction_zero_gives_empty_validation_set():
    d = load("digits", val_fraction=0)
    assert d.val[0].shape == (0, 1, 8, 8) and d.val[1].shape == (0,)
    assert d.val[0].dtype == torch.float32 and d.val[1].dtype == torch.int64
    assert len(d.train[1]) == 1438
    assert "val:" in repr(d)


def test_val_fraction_other_value():
    d = load("digits", val_fraction=0.5, test_fraction=0.25)
    assert len(d.test[1]) == 449  # round(0.25 * 1797)
    assert len(d.val[1]) == 674 and len(d.train[1]) == 674


def test_subset_limits_train_plus_val_only():
    d = load("digits", subset=100)
    assert len(d.train[1]) == 80 and len(d.val[1]) == 20 and len(d.test[1]) == 359
    big = load("digits", subset=10**6)
    assert len(big.train[1]) + len(big.val[1]) == 1438


def test_normalize_uses_training_statistics():
    raw = load("digits", seed=2)
    norm = load("digits", seed=2, normalize=True)
    Xtr = raw.train[0].double()
    mean = Xtr.mean(dim=(0, 2, 3), keepdim=True)  # one channel: a single mean and std
    std = Xtr.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    for split in ("train", "val", "test"):
        expected = (getattr(raw, split)[0].double() - mean) / std
        assert torch.allclose(getattr(norm, split)[0].double(), expected, atol=1e-5)
    assert abs(norm.train[0].mean().item()) < 1e-5 and abs(norm.train[0].std(unbiased=False).item() - 1) < 1e-4
    assert abs(norm.test[0].mean().item()) > 1e-4  # test statistics are not used


def test_normalize_per_feature_for_vectors():
    d = load("teacher_student", normalize=True, num_samples=2000)
    X = d.train[0].double()
    assert torch.allclose(X.mean(0), torch.zeros(20, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(X.std(0, unbiased=False), torch.ones(20, dtype=torch.float64), atol=1e-4)


def test_repr_shows_sizes_shapes_and_classes():
    text = repr(load("digits"))
    for part in ("digits", "(1150, 1, 8, 8)", "(288, 1, 8, 8)", "(359, 1, 8, 8)", "10/10", "float32"):
        assert part in text


# ----------------------------------------------------------------------------- synthetic sets

def _forbid_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Make every socket entry point raise, and log the attempts.

    The log matters because mnist1d's get_dataset swallows all exceptions with a bare except.
    mnist1d is imported first: importing it imports urllib3, which probes IPv6 support by
    binding a local socket, which is not a network request.
    """
    import mnist1d.data  # noqa: F401

    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_mnist1d_generated_offline_without_files(monkeypatch, tmp_path):
    attempts = _forbid_network(monkeypatch)
    monkeypatch.chdir(tmp_path)  # get_dataset would write ./mnist1d_data.pkl here
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    d = load("mnist1d")
    assert np.random.rand() == expected_next  # the caller's global numpy RNG is left alone
    assert attempts == [] and list(tmp_path.iterdir()) == []
    assert d.input_shape == (40,) and d.num_features == 40 and d.num_classes == 10
    assert [len(s[1]) for s in (d.train, d.val, d.test)] == [3200, 800, 1000]
    assert d.train[0].dtype == torch.float32 and d.train[1].dtype == torch.int64
    assert set(d.test[1].tolist()) == set(range(10))


def test_mnist1d_test_split_is_the_generators(monkeypatch, tmp_path):
    attempts = _forbid_network(monkeypatch)
    monkeypatch.chdir(tmp_path)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = 300
    ref = make_dataset(args)
    d = load("mnist1d", num_samples=300, seed=1)
    assert torch.allclose(d.test[0], torch.as_tensor(ref["x_test"], dtype=torch.float32))
    assert d.test[1].tolist() == ref["y_test"].tolist()
    assert len(d.train[1]) + len(d.val[1]) == 240
    other = load("mnist1d", num_samples=300, data_seed=7)
    assert not torch.equal(other.test[0], d.test[0])
    assert attempts == []


def test_teacher_student_width_labels_and_balance():
    d = load("teacher_student")
    assert d.info["teacher_width"] == 8 and d.input_shape == (20,) and d.num_classes == 10
    for _, y in (d.train, d.val, d.test):
        assert set(y.tolist()) == set(range(10))
    freq = np.bincount(d.train[1].numpy(), minlength=10) / len(d.train[1])
    assert freq.min() > 0.05 and freq.max() < 0.15
    # Labels are the argmax of the stated teacher, recomputed here in numpy.
    t = {k: v.numpy() for k, v in d.info["teacher"].items()}
    assert t["W1"].shape == (8, 20) and t["W2"].shape == (10, 8)
    X = d.test[0].numpy().astype(np.float64)
    H = np.tanh(X @ t["W1"].T + t["b1"])
    y = np.argmax(H @ t["W2"].T + t["b2"], axis=1)
    assert (y == d.test[1].numpy()).all()
    # Every hidden unit matters: freezing any one at its mean changes many labels.
    for j in range(8):
        H2 = H.copy()
        H2[:, j] = H[:, j].mean()
        assert (np.argmax(H2 @ t["W2"].T + t["b2"], axis=1) != y).mean() > 0.05


def test_teacher_student_options_and_seeds():
    d = load("teacher_student", teacher_width=5, in_dim=7, num_classes=3, num_samples=1000, test_fraction=0.3)
    assert d.info["teacher_width"] == 5 and d.input_shape == (7,) and d.num_classes == 3
    assert len(d.test[1]) == 300 and len(d.val[1]) == 140 and len(d.train[1]) == 560
    assert set(d.train[1].tolist()) == {0, 1, 2}
    wide = load("teacher_student", teacher_width=30, in_dim=7, num_samples=500)  # wider than the input
    assert wide.info["teacher"]["W1"].shape == (30, 7)
    a, b = load("teacher_student", num_samples=500, seed=1), load("teacher_student", num_samples=500, seed=2)
    assert torch.equal(a.test[0], b.test[0])  # same task across seeds
    assert not torch.equal(a.train[0], b.train[0])
    c = load("teacher_student", num_samples=500, data_seed=1)
    assert not torch.equal(a.test[0], c.test[0])


# ----------------------------------------------------------------------------- IDX files

@pytest.mark.parametrize("gz", [False, True, (True, False, False, True)])
def test_mnist_idx_values_and_order(tmp_path, gz):
    arrays = mnist_arrays()
    write_mnist(tmp_path, arrays, gz=gz)
    d = load("mnist", root=tmp_path, val_fraction=0.2)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert d.test[0].shape == (10, 1, 28, 28) and d.test[0].dtype == torch.float32
    # Test split: every pixel and label exactly as written, in file order, scaled by 1/255.
    expected = torch.as_tensor(arrays["test_images"], dtype=torch.float32)[:, None] / 255
    assert torch.equal(d.test[0], expected)
    assert d.test[1].tolist() == arrays["test_labels"].tolist()
    assert d.test[0][0, 0, 5, 7].item() == 0.0
    # Train + validation: the 20 training images, each with its own label, 16 / 4 split.
    assert len(d.train[1]) == 16 and len(d.val[1]) == 4
    X = torch.cat([d.train[0], d.val[0]])
    y = torch.cat([d.train[1], d.val[1]])
    ids = _ids(X)
    assert sorted(ids) == list(range(20))
    for row, i, label in zip(X, ids, y.tolist()):
        assert torch.equal(row[0], torch.as_tensor(arrays["train_images"][i], dtype=torch.float32) / 255)
        assert label == arrays["train_labels"][i]
    assert X.max().item() == 1.0


@pytest.mark.parametrize("sub", ["", "mnist", "mnist/raw"])
def test_mnist_subfolders(tmp_path, sub):
    write_mnist(tmp_path / sub, mnist_arrays(), gz=True)
    d = load("mnist", root=tmp_path)
    assert len(d.test[1]) == 10


def test_fashion_mnist_folders_and_class_names(tmp_path):
    arrays = mnist_arrays(seed=4)
    write_mnist(tmp_path / "FashionMNIST" / "raw", arrays)
    d = load("fashion_mnist", root=str(tmp_path), val_fraction=0)
    assert d.info["class_names"][9] == "Ankle boot"
    assert _ids(d.test[0]) == list(range(100, 110))
    assert sorted(_ids(d.train[0])) == list(range(20))
    with pytest.raises(FileNotFoundError):
        load("mnist", root=tmp_path)  # fashion's torchvision folder is not searched for mnist


def test_mnist_seed_shuffles_train_but_not_test(tmp_path):
    write_mnist(tmp_path, mnist_arrays())
    a, b = load("mnist", root=tmp_path, seed=0), load("mnist", root=tmp_path, seed=1)
    assert _ids(a.train[0]) != _ids(b.train[0])
    assert torch.equal(a.test[0], b.test[0])
    assert _ids(load("mnist", root=tmp_path, seed=0).train[0]) == _ids(a.train[0])


def test_missing_root_message():
    with pytest.raises(FileNotFoundError) as err:
        load("mnist")
    msg = str(err.value)
    for name in IDX_NAMES:
        assert name in msg
    assert "root" in msg and "download" in msg


def test_missing_idx_file_message(tmp_path):
    arrays = mnist_arrays()
    write_mnist(tmp_path, arrays)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load("fashion_mnist", root=tmp_path)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and "train-images-idx3-ubyte" not in msg
    assert str(tmp_path) in msg and str(tmp_path / "fashion_mnist" / "raw") in msg
    assert "download" in msg


def _corrupt_cases(arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    good = idx_bytes(arrays["train_images"])
    return {
        "bad magic": b"\x01\x00" + good[2:],
        "unknown type byte": good[:2] + b"\x07" + good[3:],
        "truncated data": good[:-5],
        "extra data": good + b"\x00",
        "truncated header": good[:9],
        "empty": b"",
        "truncated gzip": gzip.compress(good)[:-30],
        "int32 images": idx_bytes(arrays["train_images"].astype(np.int32), type_byte=0x0C),
        "labels as images": idx_bytes(arrays["train_labels"]),
    }


@pytest.mark.parametrize("case", list(_corrupt_cases(mnist_arrays())))
def test_corrupt_idx_raises_value_error(tmp_path, case):
    arrays = mnist_arrays()
    write_mnist(tmp_path, arrays)
    (tmp_path / IDX_NAMES[0]).write_bytes(_corrupt_cases(arrays)[case])
    with pytest.raises(ValueError) as err:
        load("mnist", root=tmp_path)
    assert IDX_NAMES[0] in str(err.value)


def test_idx_label_problems(tmp_path):
    arrays = mnist_arrays()
    write_mnist(tmp_path, arrays)
    write_idx(tmp_path / IDX_NAMES[1], arrays["train_labels"][:-1])
    with pytest.raises(ValueError, match="labels"):
        load("mnist", root=tmp_path)
    write_idx(tmp_path / IDX_NAMES[1], np.full(20, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match="outside 0..9"):
        load("mnist", root=tmp_path)


# ----------------------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("sub,protocol", [("", 4), ("cifar-10-batches-py", 2), ("cifar10", 5)])
def test_cifar10_values_layout_and_order(tmp_path, sub, protocol):
    write_cifar(tmp_path / sub, protocol=protocol)
    d = load("cifar10", root=tmp_path, val_fraction=0.25)
    assert d.input_shape == (3, 32, 32) and d.num_features == 3072 and d.info["class_names"][0] == "airplane"
    assert len(d.train[1]) == 15 and len(d.val[1]) == 5 and len(d.test[1]) == 10
    X_test, y_test = d.test
    assert X_test.dtype == torch.float32 and y_test.dtype == torch.int64
    # Channel planes: red 10, green 20, blue 30; the id sits at red (1, 2), 255 at blue (31, 31).
    assert [round(v * 255) for v in X_test[:, 0, 1, 2].tolist()] == list(range(200, 210))
    assert torch.all(X_test[:, 1] == 20 / 255) and torch.all(X_test[:, 2, 31, 31] == 1.0)
    assert torch.all(X_test[:, 2, 31, 30] == 30 / 255) and torch.all(X_test[:, 0, 0, 0] == 10 / 255)
    assert y_test.tolist() == [(7 * i) % 10 for i in range(10)]
    X = torch.cat([d.train[0], d.val[0]])
    y = torch.cat([d.train[1], d.val[1]])
    ids = [round(v * 255) for v in X[:, 0, 1, 2].tolist()]
    assert sorted(ids) == [10 * b + i for b in range(5) for i in range(4)]
    for i, label in zip(ids, y.tolist()):
        b, k = divmod(i, 10)
        assert label == (b * 4 + k) % 10


def test_cifar10_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load("cifar10")
    assert "data_batch_1" in str(err.value) and "test_batch" in str(err.value)
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load("cifar10", root=tmp_path)
    msg = str(err.value)
    assert "data_batch_3" in msg and "test_batch" in msg and "data_batch_2" not in msg
    assert str(tmp_path / "cifar-10-batches-py") in msg and "download" in msg


class _Planted:
    """Unpickling this would create a file, if the loader allowed arbitrary globals."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": _Planted(marker), b"labels": []}, fh)
    with pytest.raises(ValueError, match="data_batch_2"):
        load("cifar10", root=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [1]},
    {b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [1, 2]},
    {b"data": np.zeros((2, 3072), dtype=np.float32), b"labels": [1, 2]},
    {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [1, 12]},
    {b"labels": [1, 2]},
    [1, 2, 3],
])
def test_cifar10_malformed_batch(tmp_path, payload):
    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump(payload, fh)
    with pytest.raises(ValueError, match="test_batch"):
        load("cifar10", root=tmp_path)


def test_cifar10_truncated_pickle(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_5"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="data_batch_5"):
        load("cifar10", root=tmp_path)


def test_fixture_names_match_the_loader():
    # Guards the fixtures themselves: they must use the names the real data sets use.
    assert CIFAR_NAMES == data._CIFAR_TRAIN + (data._CIFAR_TEST,)
    assert IDX_NAMES == tuple(data._IDX_FILES.values())
