"""Checkpoints: written atomically, read back without executing code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts saved with
`torch.save` and loaded with `weights_only=True`, so loading one never unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from .config import ModelConfig, TrainConfig
from .errors import UserError, os_reason

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model_config", "train_config", "model", "iteration", "vocab")


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(file)` so that a crash at any moment leaves either the old or
    the new file, never a partial one: a temporary file of this process's own, flush, fsync,
    rename, fsync the directory. Errors propagate, with the temporary file removed."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                                   suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write `payload` to `path` atomically (`write_atomically`). A failed write (a full disk,
    say) raises UserError naming the path and the reason, and leaves the old file as it was."""
    path = Path(path)
    try:
        write_atomically(path, lambda f: torch.save({"format_version": FORMAT_VERSION,
                                                     **payload}, f))
    except (OSError, RuntimeError) as e:
        reason = os_reason(e)
        if isinstance(e, RuntimeError) and reason == str(e):
            raise  # torch failed for a reason of its own, not the file system's
        raise UserError(f"could not write checkpoint {path} ({reason}); the previous "
                        "checkpoint there is unchanged") from e


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and check a checkpoint; every problem becomes one UserError naming the file."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except OSError as e:  # unreadable, a directory, ...
        raise UserError(f"cannot read checkpoint {path} ({os_reason(e)})") from e
    except Exception as e:  # truncated zip, bad pickle, disallowed global, ...
        reason = str(e).strip().split("\n")[0].split(". ")[0] or type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated ({reason})") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise UserError(f"checkpoint {path} is not a tinygpt checkpoint (missing fields)")
    version = ckpt["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"checkpoint {path} is not a tinygpt checkpoint (format version "
                        f"{version!r})")
    if version > FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format version {version}, newer than this tinygpt "
            f"understands ({FORMAT_VERSION}); upgrade tinygpt"
        )
    configs = {}
    for key, cls in (("model_config", ModelConfig), ("train_config", TrainConfig)):
        try:
            configs[key] = cls(**ckpt[key])
        except TypeError as e:
            raise UserError(f"checkpoint {path} has an unreadable {key} ({e})") from e
        try:
            configs[key].validate()
        except UserError as e:
            raise UserError(f"checkpoint {path} has an invalid {key}: {e}") from e
    vocab, vocab_size = ckpt["vocab"], configs["model_config"].vocab_size
    if not isinstance(vocab, str) or len(set(vocab)) != len(vocab):
        raise UserError(f"checkpoint {path} has a malformed vocabulary (not a string of distinct "
                        "characters)")
    if len(vocab) != vocab_size:
        raise UserError(f"checkpoint {path} has {len(vocab)} characters in its vocabulary but a "
                        f"model built for {vocab_size}")
    data = ckpt.get("data")  # absent from checkpoints older than the record
    if data is not None and not (
            isinstance(data, dict) and isinstance(data.get("path"), str)
            and isinstance(data.get("sha256"), str) and len(data["sha256"]) == 64):
        raise UserError(f"checkpoint {path} has a malformed data record ({data!r:.80})")
    backend = ckpt.get("backend")  # the backend that trained it; absent from older checkpoints
    if backend is not None and backend not in ("torch", "triton", "reference"):
        raise UserError(f"checkpoint {path} names an unknown backend ({backend!r:.40})")
    iteration, weights = ckpt["iteration"], ckpt["model"]
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise UserError(f"checkpoint {path} has a malformed iteration ({iteration!r})")
    if not isinstance(weights, dict) or not all(map(torch.is_tensor, weights.values())):
        raise UserError(f"checkpoint {path} has malformed weights (not a dict of tensors)")
    broken = [name for name, t in weights.items()
              if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise UserError(f"checkpoint {path} has non-finite weights (NaN or inf in "
                        f"{', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})")
    return ckpt


def restore(target, state: dict, path: str | os.PathLike, what: str = "weights") -> None:
    """`target.load_state_dict(state)` (a model or an optimizer), with a clear error when the
    checkpoint's tensors do not fit it."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        # load_state_dict heads its list of problems "Error(s) in loading ...:"; name the first
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
            lines.pop(0)
        first = lines[0].rstrip(".") if lines else type(e).__name__
        raise UserError(f"checkpoint {path}: its {what} do not fit the model ({first})") from e
