"""One data directory, one server: a lock file held for the life of the process, and the
process's own upload scratch folder.

`claim_data_dir` takes an exclusive `fcntl.flock` on `<data dir>/pagechat.lock` before the
server touches anything in the directory. The kernel drops the lock when the process ends, a
crash (SIGKILL) included, so a stale lock file never blocks a restart. A second server on the
same directory gets `DataDirBusy`, whose message names the holder's pid.

Chainlit keeps each browser session's uploads under `FILES_DIRECTORY`; here that is
`<data dir>/sessions/<pid>-<random>/`, one folder per process (`scratch_dir`). A server
deletes only its own folder, and, at start while it holds the lock, the leftovers of servers
that are gone.

Everything in the data directory is private to the server's user (`make_private`): the
directory 0700, files 0600, and the process's umask 077, so the database, its WAL, uploads and
secrets are created that way; a directory made by an older version is brought in line at start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from pathlib import Path

LOCK_NAME = "pagechat.lock"
SCRATCH_NAME = "sessions"


class DataDirBusy(RuntimeError):
    """Another live process holds the data directory's lock."""


class DataDirLock:
    """An exclusive flock on `<data_dir>/pagechat.lock`, held until `release` or process exit."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        # os.open's descriptors are not inherited by child processes (O_CLOEXEC since 3.4):
        # a subprocess cannot keep the lock alive after this process is gone.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"another pagechat server (pid {holder})" if holder else "another pagechat server"
            raise DataDirBusy(
                f"{who} is already using the data directory {self.data_dir}. "
                "Stop it first, or give this server its own directory with PAGECHAT_DATA_DIR."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor drops the flock


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    return None


_held: dict[Path, DataDirLock] = {}  # kept for the life of the process


def claim_data_dir(data_dir: Path) -> DataDirLock:
    """Create `data_dir` if needed and lock it for this process (DataDirBusy if taken)."""
    data_dir = data_dir.resolve()
    lock = _held.get(data_dir)
    if lock is None or lock.fd is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = DataDirLock(data_dir)
        lock.acquire()
        _held[data_dir] = lock
    return lock


PRIVATE_UMASK = 0o077


def make_private(data_dir: Path) -> None:
    """Directories 0700 and files 0600 under `data_dir`, now and for what this process creates.

    The umask is process-wide: the data directory is not the only thing a server writes, and
    nothing it writes is meant for other local users. Symlinks are left alone.
    """
    os.umask(PRIVATE_UMASK)
    root = data_dir.resolve()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(path, 0o600)


def scratch_dir(data_dir: Path) -> Path:
    """This process's own upload scratch folder; leftovers of earlier processes are removed.

    Call while holding the data directory's lock: no other live server uses the folder then.
    """
    root = data_dir.resolve() / SCRATCH_NAME
    mine = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    mine.mkdir(parents=True, exist_ok=True)
    return mine
