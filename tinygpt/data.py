"""Corpus loading, the character tokenizer, and random training batches."""

from __future__ import annotations

import codecs
import hashlib
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9


def cache_dir() -> Path:
    """Where downloads live: $TINYGPT_CACHE, else the platform's user cache directory
    ($XDG_CACHE_HOME only when absolute, as the XDG spec says)."""
    if env := os.environ.get("TINYGPT_CACHE"):
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        xdg = Path(os.environ.get("XDG_CACHE_HOME", ""))
        base = xdg if xdg.is_absolute() else Path.home() / ".cache"
    return base / "tinygpt"


def _unusable_cache(directory: Path, e: OSError) -> UserError:
    named = " (from TINYGPT_CACHE)" if os.environ.get("TINYGPT_CACHE") else ""
    if os.path.exists(directory) and not os.path.isdir(directory):
        problem = "is not a directory"
    else:
        problem = f"cannot be used ({e.strerror or e})"
    return UserError(f"cache directory {directory}{named} {problem}; set TINYGPT_CACHE to a "
                     "writable directory, or pass a text file with --data FILE")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def default_corpus() -> Path:
    """tiny Shakespeare, downloaded once, verified by sha256 and cached.

    The download goes to a temporary file that replaces the cache only once its checksum
    matches, so an interrupted or corrupted download never spoils a good cache.
    """
    path = cache_dir() / "tinyshakespeare.txt"
    try:
        if path.is_file() and file_sha256(path) == SHAKESPEARE_SHA256:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".download-")
    except OSError as e:
        raise _unusable_cache(path.parent, e) from e
    print(f"downloading tiny Shakespeare to {path}", file=sys.stderr)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
            out.write(r.read())
        if file_sha256(tmp) != SHAKESPEARE_SHA256:
            raise UserError(
                f"the download from {SHAKESPEARE_URL} does not match its sha256; "
                "pass your own copy with --data FILE"
            )
        os.replace(tmp, path)
    except OSError as e:  # URLError is an OSError
        raise UserError(
            f"could not download tiny Shakespeare ({e}); put a copy of it at {path} "
            "(TINYGPT_CACHE sets that directory), or pass another text with --data FILE") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_text(path: str | os.PathLike) -> str:
    """The whole file as text, less a byte-order mark, or a UserError saying why it cannot be a
    corpus."""
    return read_corpus(path)[0]


def read_corpus(path: str | os.PathLike) -> tuple[str, str]:
    """`read_text`, and the sha256 of the file's bytes, from one read."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"data path is not a file: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path} ({e.strerror or e})") from e
    digest = hashlib.sha256(raw).hexdigest()
    raw = raw.removeprefix(codecs.BOM_UTF8)  # some editors start UTF-8 files with one
    if not raw:
        raise UserError(f"data file is empty: {path}")
    if b"\x00" in raw:
        raise UserError(f"data file looks binary (it contains NUL bytes): {path}")
    try:
        return raw.decode("utf-8"), digest
    except UnicodeDecodeError as e:
        raise UserError(
            f"data file is not UTF-8 text (bad byte at offset {e.start}): {path}") from e


class Tokenizer:
    """Maps each distinct character of the corpus to an integer id (sorted by code point)."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> Tokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            shown = ", ".join(repr(c) for c in missing)
            raise UserError(f"characters not in the vocabulary: {shown}")
        return [self.stoi[c] for c in text]

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` for a whole corpus: int64 ids via numpy, 4 bytes per character on the way
        rather than a Python int each (unknown characters are an error here too)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one per character
        table = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # sorted code points
        ids = np.searchsorted(table, codes)
        ids_in_range = np.minimum(ids, len(table) - 1)
        if not np.array_equal(table[ids_in_range], codes):
            self.encode("".join(sorted(set(text))))  # raises, naming the unknown characters
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


class Batches:
    """Random (input, target) windows from a 90/10 train/val split, drawn on `device`.

    Training micro-batch m of every step comes from its own random stream m (`streams` lists the
    ones this process draws); evaluation has a stream of its own. Streams are seeded from `seed`,
    so batches are reproducible, independent of how micro-batches are spread over processes, and
    their positions can be saved in a checkpoint (`state()` / `load_state()`).
    """

    EVAL_STREAM = -1

    def __init__(self, text: str, tokenizer: Tokenizer, block_size: int, batch_size: int,
                 device: torch.device, seed: int, streams=range(1)):
        data = torch.from_numpy(tokenizer.encode_array(text))  # (N,) int64
        n_train = int(TRAIN_FRACTION * len(data))
        self.splits = {"train": data[:n_train].to(device), "val": data[n_train:].to(device)}
        for name, split in self.splits.items():
            if len(split) < block_size + 1:
                raise UserError(
                    f"text too short: {len(data)} characters leave {len(split)} for the {name} "
                    f"split, which needs at least block_size + 1 = {block_size + 1}; "
                    f"use more text or a smaller --block-size"
                )
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.generators = {  # torch takes seeds below 2^64
            s: torch.Generator().manual_seed((seed * 1_000_003 + s + 1) % 2**64)
            for s in [*streams, self.EVAL_STREAM]
        }
        self.offsets = torch.arange(block_size + 1, device=device)  # (T+1,)

    def get(self, split: str, stream: int = EVAL_STREAM) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of `split` from training stream `stream` (the evaluation stream if omitted)."""
        data = self.splits[split]
        starts = torch.randint(len(data) - self.block_size, (self.batch_size,),
                               generator=self.generators[stream])  # (B,)
        windows = data[starts.to(self.device)[:, None] + self.offsets]  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)

    def state(self) -> dict[int, torch.Tensor]:
        return {s: g.get_state() for s, g in self.generators.items()}

    def load_state(self, state: dict[int, torch.Tensor]) -> None:
        for s, g in self.generators.items():
            if s in state:
                g.set_state(state[s])

    @staticmethod
    def merge_states(states: list[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """One state for all streams from every process's `state()`, the first process's
        evaluation stream winning (it is the one that evaluates)."""
        merged = {}
        for state in reversed(states):
            merged.update(state)
        return merged
