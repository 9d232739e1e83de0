"""One writer per run folder: an exclusive OS lock held for a run's lifetime, and collision-free names.

:class:`RunLock` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<folder>/.lock`` and writes the
holder's PID, host and start time into that file. The kernel releases the lock when the holding
process exits in any way (normal exit, exception, SIGINT, SIGKILL), so a lock left by a killed
process is *stale*: the file is still there but no longer locked, and the next writer takes it
over (:attr:`RunLock.stale` then holds the dead holder's record). A second writer while the
holder lives gets :class:`RunLockedError` at once, naming the holder's PID.

The lock is advisory (only bmrs-pyro honours it) and meant for local file systems: ``flock`` on
NFS or other network file systems may not exclude writers on other machines.

:func:`create_unique_dir` makes a new folder atomically (``mkdir`` fails if the name exists) and
adds ``-2``, ``-3``, ... to the name until one is free, so two runs started in the same second with
default names never share a folder.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
from pathlib import Path
from typing import Optional

try:  # POSIX; on other systems the lock degrades to a no-op (documented in the README)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError", "create_unique_dir", "lock_holder"]


class RunLockedError(ValueError):
    """Another live process holds the lock of this folder (exit code 2 on the command line)."""


def _read_record(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_holder(folder: str | os.PathLike) -> Optional[dict]:
    """The record (``pid``, ``host``, ``since``, ``command``) of the live holder of ``folder``'s lock,
    or None if nobody holds it (no lock file, or a stale one)."""
    path = Path(folder) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_record(path)
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """Exclusive lock of a run folder; use as a context manager or call :meth:`acquire`/:meth:`release`.

    Args:
        folder: the run folder (must exist).
        purpose: a word for the messages and the record (``"run"``, ``"report"``, ``"compare"``).

    Raises (from :meth:`acquire`):
        RunLockedError: a live process holds the lock; the message names its PID.
        PermissionError: the lock file cannot be created (the message names it).
    """

    def __init__(self, folder: str | os.PathLike, purpose: str = "run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.purpose = purpose
        self.stale: Optional[dict] = None
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock without waiting; records this process in the lock file."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            raise PermissionError(f"permission denied: cannot create the lock file {self.path}; make {self.folder} "
                                  "writable or pick another --output") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = _read_record(self.path)
                who = f"PID {holder.get('pid', '?')}"
                if holder.get("host") and holder.get("host") != socket.gethostname():
                    who += f" on {holder['host']}"
                what = holder.get("purpose", "run")
                raise RunLockedError(
                    f"{self.folder} is in use by another bmrs {what} ({who}, since {holder.get('since', '?')}); "
                    "wait for it to finish or use another folder"
                ) from None
        previous = _read_record(self.path)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.stale = previous  # the previous holder died without releasing: the kernel freed its lock
        record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                  "since": _dt.datetime.now().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError:
            pass  # the record is informative; the flock is what excludes
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (also done by the OS when the process exits). Keeps the lock file."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty record: nobody holds it
        except OSError:
            pass
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - a forgotten lock is released with the object
        try:
            self.release()
        except Exception:
            pass


def create_unique_dir(parent: str | os.PathLike, name: str, *, max_tries: int = 1000) -> Path:
    """Create ``parent/name`` atomically, or ``parent/name-2``, ``-3``, ... if that exists; return it.

    ``mkdir`` either creates the folder or fails because it exists, so two processes can never both
    get the same folder.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, max_tries + 1):
        candidate = parent / (name if i == 1 else f"{name}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ValueError(f"{parent} already holds {max_tries} folders named {name}*; pick another --name")
