"""One run per output directory: an exclusive lock held for the whole run, which also clears the
temporary files of runs that died mid-write. No torch here."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

from .errors import UserError, os_reason

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

LOCK_NAME = ".tinygpt.lock"
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # what a run leaves, a new one must not replace


class OutDirLock:
    """Holds `OUT_DIR/.tinygpt.lock` exclusively while a run uses the directory. A second run on
    the same directory is refused with one line naming the holder. The lock dies with its process
    (kill -9 included), so a crashed run never leaves the directory locked. Directories it had to
    create are removed again if the run wrote nothing into them."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []  # the directories made for the run, deepest first

    def __enter__(self) -> OutDirLock:
        self.created = [d for d in (self.out_dir, *self.out_dir.parents) if not os.path.exists(d)]
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot use output directory {self.out_dir}/ "
                            f"({os_reason(e)})") from e
        if not _try_lock(self.fd):
            holder = _read_holder(self.fd)
            os.close(self.fd)
            self.fd = None
            raise UserError(f"{self.out_dir}/ is in use by another tinygpt run ({holder}); wait "
                            "for it to finish or stop it, or pass another --out-dir")
        try:
            os.ftruncate(self.fd, 1)  # byte 0 is the one locked on Windows; the holder follows
            os.lseek(self.fd, 1, os.SEEK_SET)
            os.write(self.fd, (f"pid {os.getpid()} on {socket.gethostname()}, started "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S')}").encode())
        except OSError as e:
            self.__exit__()
            raise UserError(f"cannot write {self.path} ({os_reason(e)})") from e
        for name in RUN_FILES:  # a dead run's half-written checkpoint or record
            for stale in self.out_dir.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        if self.created and [p.name for p in self.out_dir.iterdir()] == [LOCK_NAME]:
            self.path.unlink()  # nothing written: leave no trace
            for directory in self.created:
                with contextlib.suppress(OSError):  # another process may have used it since
                    directory.rmdir()
        os.close(self.fd)  # closing the descriptor releases the lock; in a directory the run
        self.fd = None     # used, the file stays: removing it would race with the next run


def _try_lock(fd: int) -> bool:
    try:
        if sys.platform == "win32":
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by another process
        return False
    return True


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 1, os.SEEK_SET)
        return os.read(fd, 200).decode(errors="replace").strip() or "starting"
    except OSError:
        return "its details unreadable"


def existing_run_files(out_dir: str | os.PathLike) -> list[str]:
    """The checkpoints and record a run left in `out_dir`, which a new run must not replace
    unasked."""
    return [name for name in RUN_FILES if (Path(out_dir) / name).exists()]
