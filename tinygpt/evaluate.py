"""Scoring a whole split, every token once: the loss character-level papers report.

Windows of block_size tokens slide by half a block; the first window scores all its targets, each
later one only its second half, so every target after the split's first token is scored exactly
once with at least half a block of context (a last window, aligned to the split's end, scores
what the stride left). The result is deterministic: no sampling, no dropout.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .config import ModelConfig, TrainConfig, split_ends
from .corpus import load, read_windows
from .data import cache_dir, default_corpus
from .errors import UserError
from .model import build_model


def windows(length: int, block_size: int) -> Iterator[tuple[int, int]]:
    """(start, first scored position) of each window over `length` tokens: the window's inputs
    are tokens start..start+T-1, its targets start+1..start+T, and it scores the targets from
    position `first` (0..T-1) on."""
    T = min(block_size, length - 1)
    stride = max(T // 2, 1)
    start, scored = 0, 0  # scored: targets 1..scored are done
    while scored < length - 1:
        start = min(start, length - 1 - T)  # the last window ends at the split's end
        first = scored - start  # the first target not yet scored, in the window
        yield start, first
        scored = start + T
        start += stride


@torch.no_grad()
def score(model: torch.nn.Module, ids: np.ndarray, block_size: int, batch_size: int,
          device: torch.device, part: tuple[int, int] | None = None) -> tuple[float, int]:
    """The summed negative log-likelihood (nats) of every target in `ids[lo:hi]` (`part`; all
    of `ids` if None) after the first, and their count."""
    model.eval()
    lo, hi = part or (0, len(ids))
    total, count = 0.0, 0
    batch: list[tuple[int, int]] = []
    T = min(block_size, hi - lo - 1)

    def run(batch):
        starts = lo + np.array([s for s, _ in batch])  # (B,)
        x = torch.from_numpy(read_windows(ids, starts, T + 1).astype(np.int64)).to(device)
        # x: (B, T+1)
        logits, _ = model(x[:, :-1])  # (B, T, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (B, T)
        keep = torch.arange(T, device=device)[None, :] >= torch.tensor(
            [f for _, f in batch], device=device)[:, None]  # (B, T)
        return float(nll[keep].double().sum()), int(keep.sum())

    for window in windows(hi - lo, block_size):
        batch.append(window)
        if len(batch) == batch_size:
            s, n = run(batch)
            total, count, batch = total + s, count + n, []
    if batch:
        s, n = run(batch)
        total, count = total + s, count + n
    return total, count


def bits(loss: float) -> float:
    """A loss in nats per token as bits per token (per character, or per byte)."""
    return loss / math.log(2)


@dataclasses.dataclass(frozen=True)
class Scored:
    split: str
    loss: float  # nats per token
    count: int  # tokens scored
    window: int  # tokens a window holds
    unit: str  # "character" or "byte"
    seconds: float

    @property
    def bits(self) -> float:
        return bits(self.loss)

    @property
    def line(self) -> str:
        return (f"{self.split}: loss {self.loss:.4f}, {self.bits:.4f} bits per {self.unit} "
                f"({self.count:,} {self.unit}s scored in windows of {self.window}, "
                f"{self.seconds:.1f} s)")


def score_checkpoint(path: Path, split: str, device: torch.device, data: str | None = None,
                     batch_size: int = 16, say: Callable[[str], None] = lambda line: None
                     ) -> Scored:
    """The checkpoint at `path` scored on the whole `split` ("train", "val" or "test") of the
    text it was trained on (`data` names another with the same characters), split as it was."""
    ckpt = load_checkpoint(path)
    model_cfg = ModelConfig(**ckpt["model_config"])
    cfg = TrainConfig(**ckpt["train_config"])
    recorded = ckpt.get("data")
    given = data is not None
    data = data if given else recorded["path"] if recorded else str(default_corpus())
    corpus = load(data, cfg.tokenizer, cache_dir() / "corpora", say)
    if recorded and corpus.sha256 != recorded["sha256"] and not given:
        raise UserError(f"{data} has changed since {path} was trained on it; pass --data FILE "
                        "to score another text")
    if cfg.tokenizer == "chars" and corpus.vocab != ckpt["vocab"]:
        raise UserError(f"{data} has other characters than {path}'s vocabulary")
    train, val, test = split_ends(cfg.split, len(corpus.ids))
    part = {"train": (0, train), "val": (train, val), "test": (val, test)}[split]
    if part[1] - part[0] < 2:
        raise UserError(f"the {split} split of {data} is empty under --split {cfg.split}"
                        + ("; train with three parts (--split 0.9,0.05,0.05) for a test split"
                           if split == "test" else ""))
    model = build_model(model_cfg, "torch")
    model.load_state_dict(ckpt["model"])  # checked against its config on loading
    model.to(device)
    started = time.perf_counter()
    total, count = score(model, corpus.ids, model_cfg.block_size, batch_size, device, part)
    return Scored(split, total / count, count, min(model_cfg.block_size, part[1] - part[0] - 1),
                  "byte" if cfg.tokenizer == "bytes" else "character",
                  time.perf_counter() - started)
