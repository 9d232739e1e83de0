"""Atomic file writes: the bottom layer every module that saves files imports.

A crash, a full disk or Ctrl-C while writing never leaves half a file: each writer serialises in
memory, writes a temporary file beside the target, fsyncs it and ``os.replace``s it over the
target. Nothing in this module imports another module of the package, so ``runs``, ``compare``,
``checkpoint`` and ``analysis`` can all use it without an import cycle.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = ["atomic_write_with", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "json_default",
           "jsonable"]


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Let ``write(tmp)`` fill a temporary file beside ``path``, then ``os.replace`` it over ``path``.

    For writers that need a file name (netCDF, ...). On any error, Ctrl-C included, the temporary
    file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp creates the file 0600; give it the permissions an ordinary open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None and err.errno:
            # e.g. a full disk while writing: say which file (OSError picks the errno's subclass).
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, then os.replace.

    On any error the temporary file is removed and ``path`` keeps its previous content.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write_with(path, write)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_default(value: Any) -> Any:
    """``json`` fallback: tensors and numpy scalars as numbers/lists, paths as strings, sets as lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def jsonable(v: Any) -> Any:
    """``v`` with tensors as lists, non-finite floats as strings and unknown objects as their repr."""
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return repr(v)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Serialise ``obj`` as indented JSON in memory first, then write it atomically.

    Serialising before touching the disk means a value that cannot be encoded raises before
    any file exists; the atomic write covers a crash while writing.
    """
    buffer = io.StringIO()
    json.dump(_finite(obj), buffer, indent=2, default=json_default, allow_nan=False)
    buffer.write("\n")
    return atomic_write_text(path, buffer.getvalue())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` made atomic (serialised to memory, then :func:`atomic_write_bytes`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
