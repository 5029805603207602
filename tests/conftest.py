"""Shared fixtures. Without CUDA, Triton kernels run in Triton's interpreter on the CPU: the
variable must be set before triton is first imported, which is why it is set here.

Tests that train on a corpus take the `corpus_path` fixture and are marked `corpus`. They use
../shared's tiny Shakespeare when it is there and a generated text otherwise; `--corpus generated`
runs them as a fresh clone would (CI does both), `--corpus shared` insists on the shared copy.

Every test draws from random generators seeded by its own name, so it sees the same inputs alone,
in the default order and in the shuffled order `--shuffle SEED` runs (CI runs one).
"""

import os
import random
import subprocess
import zlib
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def generated_text(n_chars: int = 200_000, seed: int = 0) -> str:
    """Learnable stand-in for the corpus: sentences of words from a fixed lexicon of 300 words, each
    one to three consonant-vowel(-consonant) syllables, so that a character's neighbour tells as
    much about it as in English (tiny Shakespeare's unigram / bigram entropies: 3.31 / 2.45 nats;
    this text's: 3.10 / 2.21)."""
    rng = random.Random(seed)

    def syllable() -> str:
        coda = rng.choice("nrst") if rng.random() < 0.3 else ""
        return rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") + coda

    words = ["".join(syllable() for _ in range(rng.randint(1, 3))) for _ in range(300)]
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choices(words, k=rng.randint(4, 12))).capitalize() + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


def pytest_addoption(parser):
    parser.addoption("--shuffle", type=int, metavar="SEED",
                     help="run the tests in an order shuffled by SEED")
    parser.addoption("--corpus", choices=("auto", "shared", "generated"), default="auto",
                     help="text for the tests marked corpus: ../shared's tiny Shakespeare when "
                          "present (auto), always it (shared) or the generated stand-in")


def pytest_configure(config):
    if config.getoption("--corpus") == "shared" and not SHARED_CORPUS.is_file():
        raise pytest.UsageError(f"--corpus shared: {SHARED_CORPUS} not found")


def pytest_report_header(config):
    seed = config.getoption("--shuffle")
    return None if seed is None else f"test order shuffled: --shuffle {seed}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "corpus_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.corpus)
    seed = config.getoption("--shuffle")
    if seed is not None:
        random.Random(seed).shuffle(items)


@pytest.fixture(autouse=True)
def seeded_generators(request):
    """torch's and Python's global generators seeded from the test's id, whatever ran before."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(scope="session")
def corpus_path(request, tmp_path_factory) -> Path:
    """tiny Shakespeare from ../shared or a generated text, as --corpus says."""
    if request.config.getoption("--corpus") != "generated" and SHARED_CORPUS.is_file():
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


@pytest.fixture
def spawn():
    """`subprocess.Popen` for a test: a process still running when the test ends is killed, so
    that a failing test leaves nothing behind."""
    started = []

    def popen(*args, **kwargs) -> subprocess.Popen:
        started.append(subprocess.Popen(*args, **kwargs))
        return started[-1]

    yield popen
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
