"""A run's record, `OUT_DIR/metrics.jsonl`: a JSON object a line, written by rank 0.

The first line is the header (`"kind": "header"`): the run's id (which its checkpoints keep), its
full configuration, backend and why, device and versions, corpus, the git commit of the checkout
and the command line. Then a `"step"` record every log interval (loss, learning rates, gradient
norm, speed, threads or CUDA memory) and an `"eval"` record every evaluation (losses, bits per
token, best so far, checkpoints written). Lines are flushed as they are written and made durable
with every checkpoint.

A new run writes nothing until its first checkpoint (a run stopped before it leaves no file, and
`--overwrite` replaces the earlier run's file then, as its checkpoints). A resumed run goes on in
the same file, its records past the checkpoint's iteration dropped first, so that a stopped and
resumed run's records are those of an uninterrupted one, timing fields aside.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from . import loggers
from .errors import UserError, os_reason
from .files import write_atomically

NAME = "metrics.jsonl"
TIMING = ("ms_per_step", "tokens_per_s", "elapsed", "threads", "cuda_memory_mib",
          "cuda_peak_mib", "eval_seconds")  # fields that differ between identical runs


def versions() -> dict[str, str]:
    """tinygpt, Python and the packages a run depends on, without importing them."""
    found = {"python": platform.python_version()}
    for name in ("tinygpt", "torch", "triton", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_commit(package: Path = Path(__file__).resolve().parent) -> str | None:
    """The commit of the checkout tinygpt runs from, with `+changes` when its tracked files
    differ from it; None when tinygpt is not run from its own checkout (an installed wheel, even
    inside another project's repository)."""
    where = package.parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        top, commit = (head.stdout.split("\n") + ["", ""])[:2]
        if head.returncode or Path(top).resolve() != where:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty.stdout.strip() else "")


class Metrics:
    """Appends records to `out_dir/metrics.jsonl` for the run `run_id`; see the module's text.
    `resumed_at`: the iteration a resumed run goes on from (None for a new run), whose file is
    checked and cut back here, before anything else is written; `say` hears what was dropped."""

    def __init__(self, out_dir: Path, run_id: str, header: dict, resumed_at: int | None,
                 say: Callable[[str], None], log: list[str] = ()):
        self.path, self.run_id = out_dir / NAME, run_id
        self.loggers: dict[str, object] = {}  # --log's, fed every record as it comes
        self.file = None  # open once the run has written a checkpoint
        self.broken = False  # a write failed: the run goes on without its record
        self.pending: list[str] = []  # lines waiting for the run's first checkpoint
        self.elapsed_before = 0.0  # training seconds of the sessions before this one
        kept = self._kept(resumed_at, say) if resumed_at is not None else None
        if kept is None:  # a new run, or a resumed one without a file: the record starts here
            self.pending.append(_line({"kind": "header", "run": run_id, **header}))
        else:
            self.elapsed_before = max((r.get("elapsed", 0.0) for r in kept), default=0.0)
        self.loggers = dict(zip(log, loggers.start(log, out_dir, header, run_id, resumed_at)))
        if kept is not None:
            try:
                write_atomically(self.path, lambda f: f.write("".join(map(_line, kept)).encode()))
            except OSError as e:
                self.close()
                raise UserError(f"cannot write {self.path} ({os_reason(e)})") from e
            self._open("a")

    def _kept(self, resumed_at: int, say) -> list[dict] | None:
        """The records of the file up to `resumed_at`; None when there is no file. A last line
        cut short (a crash while writing) is dropped with a line said; a file of another run, or
        one broken elsewhere, is a UserError: it is not this run's to change."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise UserError(f"cannot read {self.path} ({os_reason(e)})") from e
        lines = raw.split(b"\n")
        if lines[-1]:  # no newline at the end: the last write did not finish
            say(f"{self.path} ends in a line cut short ({len(lines[-1])} bytes); dropping it")
        records = []
        for number, line in enumerate(lines[:-1], 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
                    raise ValueError("not a record")
            except ValueError:
                raise UserError(f"{self.path} line {number} is not a record ({line[:40]!r}); "
                                "move the file away to resume with a new one") from None
            records.append(record)
        if not records or records[0].get("kind") != "header":
            raise UserError(f"{self.path} does not start with a run's header; move the file "
                            "away to resume with a new one")
        if records[0].get("run") != self.run_id:
            raise UserError(f"{self.path} is the record of another run ({records[0].get('run')}"
                            f", the checkpoint's is {self.run_id}); move it away to resume")
        kept = [r for r in records if r["kind"] == "header" or r.get("iter", 0) <= resumed_at]
        if len(kept) < len(records):
            say(f"{self.path}: dropped {len(records) - len(kept)} records past iteration "
                f"{resumed_at}, where this run resumes")
        return kept

    def _open(self, mode: str) -> None:
        try:
            self.file = open(self.path, mode, encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {self.path} ({os_reason(e)})") from e

    def add(self, record: dict) -> None:
        """One record, flushed to the file (held back until the run's first checkpoint)."""
        if "elapsed" in record:
            record["elapsed"] = round(self.elapsed_before + record["elapsed"], 3)
        for kind, logger in list(self.loggers.items()):
            try:
                logger.record(record)
            except Exception as e:
                loggers.failed(kind, e)
                del self.loggers[kind]
        line = _line(record)
        if self.broken:
            return
        if self.file is None:
            self.pending.append(line)
            return
        self._write(line)

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as e:  # the record is lost, the run is not
            print(f"tinygpt: cannot write {self.path} ({os_reason(e)}); the run goes on "
                  "without its record", file=sys.stderr)
            self.close()
            self.broken = True

    def checkpointed(self) -> None:
        """A checkpoint was written: the run's first starts the file; each makes it durable."""
        for logger in self.loggers.values():
            logger.checkpointed()
        if self.broken:
            return
        if self.file is None:
            self._open("w")  # a new run's first write: an earlier run's file goes now
            self._write("".join(self.pending))
            self.pending = []
        with contextlib.suppress(OSError, ValueError):
            os.fsync(self.file.fileno())

    def close(self) -> None:
        for kind, logger in self.loggers.items():
            try:
                logger.close()
            except Exception as e:
                loggers.failed(kind, e)
        self.loggers = {}
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()


def _line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
