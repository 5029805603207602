"""Shared fixtures. Without CUDA, Triton kernels run in Triton's interpreter on the CPU: the
variable must be set before triton is first imported, which is why it is set here."""

import os
import random
import string
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def generated_text(n_chars: int = 200_000, seed: int = 0) -> str:
    """Learnable stand-in for the corpus: sentences of words from a small fixed lexicon."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(300)]
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choices(words, k=rng.randint(4, 12))).capitalize() + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory) -> Path:
    """tiny Shakespeare from ../shared when present, a generated text otherwise."""
    if SHARED_CORPUS.is_file():
        return SHARED_CORPUS
    path = tmp_path_factory.mktemp("corpus") / "generated.txt"
    path.write_text(generated_text(), encoding="utf-8")
    return path


@pytest.fixture
def small_text_file(tmp_path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text(generated_text(20_000, seed=1), encoding="utf-8")
    return path


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
