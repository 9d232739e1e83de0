"""The file-based data sets of :func:`bmrs_pyro.data.load`: MNIST and Fashion-MNIST from their
IDX files (as distributed, or in torchvision's folders) and CIFAR-10 from its Python batches. Nothing
is downloaded: the user points ``root`` at files they already have."""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray]

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type byte -> numpy dtype (multi-byte types are big-endian in the format).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# torchvision keeps the same files under these folder names; searching them costs nothing.
_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"

_CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"),
}



def _search_dirs(name: str, root: Path) -> list[Path]:
    dirs = [root, root / name, root / name / "raw"]
    if name in _TORCHVISION_DIRS:
        dirs.append(root / _TORCHVISION_DIRS[name] / "raw")
    if name == "cifar10":
        dirs = [root, root / "cifar-10-batches-py", root / name, root / name / "cifar-10-batches-py"]
    return dirs


def _find_files(name: str, root: str | Path | None, wanted: dict[str, tuple[str, ...]], hint: str
                ) -> dict[str, Path]:
    """Map each key of ``wanted`` to the first existing file among its candidate names."""
    expected = ", ".join(names[0] for names in wanted.values())
    if root is None:
        raise FileNotFoundError(
            f"data set {name!r} is read from files you already have and nothing is downloaded: "
            f"pass root=<folder> holding {expected} ({hint})")
    root = Path(root).expanduser()
    dirs = _search_dirs(name, root)
    found: dict[str, Path] = {}
    for key, names in wanted.items():
        for d in dirs:
            hit = next((d / n for n in names if (d / n).is_file()), None)
            if hit is not None:
                found[key] = hit
                break
    missing = [names[0] for key, names in wanted.items() if key not in found]
    if missing:
        raise FileNotFoundError(
            f"data set {name!r}: missing {', '.join(missing)} ({hint}); searched "
            f"{', '.join(str(d) for d in dirs)}. Nothing is downloaded: put the files in {root}")
    return found


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (raw or gzip-compressed), checking the header against the data length."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic; IDX files start with two zero bytes instead
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc}); replace the file") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
                         "expected 0x0000 followed by a type byte and the number of dimensions")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} needed); replace the file")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header promises shape {dims} ({expected} data bytes) but the file holds "
                         f"{len(raw) - header}; the file is truncated or corrupt, replace it")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _idx_pair(images_path: Path, labels_path: Path) -> Arrays:
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected unsigned-byte images of shape (N, H, W), "
                         f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(f"{labels_path}: expected unsigned-byte labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if len(labels) and labels.max() >= 10:
        raise ValueError(f"{labels_path}: label {int(labels.max())} is outside 0..9")
    X = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return X, labels.astype(np.int64)


def _idx_set(name: str, root: str | Path | None) -> tuple[Arrays, Arrays, int, dict[str, Any]]:
    wanted = {key: (base, base + ".gz") for key, base in _IDX_FILES.items()}
    files = _find_files(name, root, wanted, hint="IDX format, each raw or .gz")
    pool = _idx_pair(files["train_images"], files["train_labels"])
    test = _idx_pair(files["test_images"], files["test_labels"])
    info: dict[str, Any] = {"source": "IDX files", "files": {k: str(v) for k, v in files.items()}}
    if name in _CLASS_NAMES:
        info["class_names"] = _CLASS_NAMES[name]
    return pool, test, 10, info


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only, so a planted batch file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy >= 2 moved these
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> Arrays:
    try:
        with path.open("rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({exc}); replace the file") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict with b'data' and b'labels', got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: the pickled dict lacks b'data' or b'labels' (keys: {sorted(map(str, batch))})")
    data, labels = np.asarray(data), np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer) \
            or (len(labels) and (labels.min() < 0 or labels.max() >= 10)):
        raise ValueError(f"{path}: b'labels' must be {len(data)} integers in 0..9")
    X = (data.astype(np.float32) / 255.0).reshape(-1, 3, 32, 32)  # rows are R plane, G plane, B plane
    return X, labels.astype(np.int64)


def _cifar10(root: str | Path | None) -> tuple[Arrays, Arrays, int, dict[str, Any]]:
    wanted = {n: (n,) for n in _CIFAR_TRAIN + (_CIFAR_TEST,)}
    files = _find_files("cifar10", root, wanted, hint="CIFAR-10 python version")
    parts = [_read_cifar_batch(files[n]) for n in _CIFAR_TRAIN]
    pool = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _read_cifar_batch(files[_CIFAR_TEST])
    info = {"source": "CIFAR-10 python batches", "files": {k: str(v) for k, v in files.items()},
            "class_names": _CLASS_NAMES["cifar10"]}
    return pool, test, 10, info
