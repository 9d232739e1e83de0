"""Writers for tiny data files in the real MNIST IDX and CIFAR-10 pickle formats, for tests.

The IDX writer follows the format description (two zero bytes, a type byte, the number of
dimensions, big-endian uint32 dimensions, then the raw big-endian data), not the loader's code.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_NAMES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    """Encode ``array`` as an IDX file (type 0x08 = unsigned byte)."""
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    dtype = {0x08: ">u1", 0x0C: ">i4"}[type_byte]
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, type_byte: int = 0x08) -> Path:
    """Write ``array`` as IDX to ``path`` (``path`` + ``.gz``, gzip-compressed, when ``gz``)."""
    data = idx_bytes(array, type_byte)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def mnist_arrays(n_train: int = 20, n_test: int = 10, seed: int = 1) -> dict[str, np.ndarray]:
    """Images whose pixel (0, 0) is the row number (train 0.., test 100..), so rows can be told apart.

    Labels run 0..9 repeatedly, so every class appears in each file.
    """
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    train[:, 0, 0] = np.arange(n_train)
    test[:, 0, 0] = 100 + np.arange(n_test)
    train[0, 5, 7], test[0, 5, 7] = 255, 0  # the extremes of the scale
    return {"train_images": train, "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
            "test_images": test, "test_labels": ((np.arange(n_test) * 3) % 10).astype(np.uint8)}


def write_mnist(folder: Path, arrays: dict[str, np.ndarray], *, gz: bool | tuple[bool, ...] = False) -> None:
    """Write the four IDX files into ``folder``; ``gz`` may be one flag or one per file."""
    flags = gz if isinstance(gz, tuple) else (gz,) * 4
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    for key, name, flag in zip(keys, IDX_NAMES, flags):
        write_idx(folder / name, arrays[key], gz=flag)


def cifar_rows(n: int, first_id: int, labels: list[int]) -> dict[bytes, object]:
    """A CIFAR-10 batch dict: rows are 1024 red, then 1024 green, then 1024 blue values.

    Red plane = 10, green = 20, blue = 30 everywhere, except red pixel (row 1, column 2), which
    holds ``first_id + i`` to identify example ``i``, and blue pixel (31, 31) = 255.
    """
    data = np.empty((n, 3072), dtype=np.uint8)
    data[:, :1024], data[:, 1024:2048], data[:, 2048:] = 10, 20, 30
    data[:, 1 * 32 + 2] = first_id + np.arange(n)
    data[:, 2048 + 31 * 32 + 31] = 255
    return {b"batch_label": b"fixture", b"labels": list(labels), b"data": data,
            b"filenames": [b"x.png"] * n}


def write_cifar(folder: Path, *, per_batch: int = 4, n_test: int = 10, protocol: int = 4) -> None:
    """Five training batches (ids 0.., 10 per batch apart) and a test batch (ids 200..)."""
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(5):
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        with open(folder / f"data_batch_{b + 1}", "wb") as fh:
            pickle.dump(cifar_rows(per_batch, 10 * b, labels), fh, protocol=protocol)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(cifar_rows(n_test, 200, [(7 * i) % 10 for i in range(n_test)]), fh, protocol=protocol)
