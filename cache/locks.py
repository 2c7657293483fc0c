"""Cross-process file locks (``flock``): released by the kernel when the holder dies, even by SIGKILL."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

from warmserve.cache.errors import LeaseTimeout


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def try_lock(path: Path, *, shared: bool = False) -> int | None:
    """Take the lock without waiting; return the fd that holds it, or None if another process has it."""
    fd = _open(path)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def locked(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Block until the lock is held (no timeout: for short critical sections only)."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def backoff(start: float = 0.02, cap: float = 1.0) -> Iterator[float]:
    """Jittered exponential sleeps for pollers, so that many waiters do not wake in step."""
    delay = start
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(cap, delay * 2)


class BuildLock:
    """One builder per key on this node; the holder's pid is written into the lock file for error messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = try_lock(self.path)
        if fd is None:
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self, timeout: float) -> bool:
        """Take the lock; return True if we had to wait for another process first."""
        if self.try_acquire():
            return False
        deadline = time.monotonic() + timeout
        for delay in backoff():
            if time.monotonic() > deadline:
                raise LeaseTimeout(
                    f"waited {timeout:.0f}s for pid {self.holder()} to finish building {self.path.stem}; "
                    "raise wait_timeout if builds take longer"
                )
            time.sleep(delay)
            if self.try_acquire():
                return True
        raise AssertionError("unreachable")  # pragma: no cover

    def release(self) -> None:
        if self._fd is not None:
            unlock(self._fd)
            self._fd = None
