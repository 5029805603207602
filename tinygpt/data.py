"""The cache directory and the default corpus, the character tokenizer, and random training
batches (`corpus` prepares a corpus for them)."""

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

from .config import split_ends
from .corpus import read_windows
from .errors import UserError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


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


class Tokenizer:
    """Maps each distinct character of the corpus to an integer id (sorted by code point)."""

    unit = "char"  # what a token is, as output names it
    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            shown = ", ".join(repr(c) for c in missing)
            raise UserError(f"characters not in the vocabulary: {shown}")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def streaming(self):
        """decode, for ids that arrive a few at a time (`final` with the last of them)."""
        return lambda ids, final=False: self.decode(ids)


class ByteTokenizer:
    """One token per byte. `chars` names byte i by chr(i), as checkpoints store a vocabulary;
    decoded text is UTF-8, bytes that are not shown as U+FFFD."""

    chars = "".join(map(chr, range(256)))
    vocab_size = 256
    unit = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def streaming(self):
        """decode, for ids that arrive a few at a time (`final` with the last of them): a
        character cut between two calls is held until its last byte."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids, final=False: decoder.decode(bytes(ids), final)


def tokenizer_for(kind: str, vocab: str) -> Tokenizer | ByteTokenizer:
    """The tokenizer a checkpoint's `kind` ("chars" or "bytes") and `vocab` describe."""
    return ByteTokenizer() if kind == "bytes" else Tokenizer(vocab)


class Batches:
    """Random (input, target) windows from the train and val parts of `ids` that `split` names
    (a prepared corpus: only the windows drawn are read), copied to `device` a batch at a time.

    Training micro-batch m of every step comes from its own random stream m (`streams` lists the
    ones this process draws); evaluation has a stream of its own. Streams are seeded from `seed`,
    so batches are reproducible, independent of how micro-batches are spread over processes, and
    their positions can be saved in a checkpoint (`state()` / `load_state()`).
    """

    EVAL_STREAM = -1

    def __init__(self, ids: np.ndarray, block_size: int, batch_size: int, device: torch.device,
                 seed: int, streams=range(1), split: str = "0.9,0.1"):
        train, val, _ = split_ends(split, len(ids))
        self.ids, self.bounds = ids, {"train": (0, train), "val": (train, val)}
        for name, (lo, hi) in self.bounds.items():
            if hi - lo < block_size + 1:
                raise UserError(
                    f"text too short: {len(ids)} tokens leave {hi - lo} for the {name} "
                    f"split, which needs at least block_size + 1 = {block_size + 1}; "
                    f"use more text or a smaller --block-size"
                )
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.generators = {  # torch takes seeds below 2^64
            s: torch.Generator().manual_seed((seed * 1_000_003 + s + 1) % 2**64)
            for s in [*streams, self.EVAL_STREAM]
        }
        self.pinned = device.type == "cuda"

    def get(self, split: str, stream: int = EVAL_STREAM) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of `split` from training stream `stream` (the evaluation stream if omitted)."""
        lo, hi = self.bounds[split]
        starts = torch.randint(hi - lo - self.block_size, (self.batch_size,),
                               generator=self.generators[stream])  # (B,)
        rows = read_windows(self.ids, lo + starts.numpy(), self.block_size + 1)  # (B, T+1)
        batch = torch.from_numpy(rows.astype(np.int64))
        if self.pinned:  # a non-blocking copy needs page-locked memory
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]  # (B, T), (B, T)

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
