"""Tokenizer, corpus loading (files and the cached download) and batches."""

import hashlib
import io
import random
import string

import numpy as np
import pytest
import torch

from tinygpt import data
from tinygpt.config import split_ends
from tinygpt.data import Batches, Tokenizer
from tinygpt.errors import UserError


def tokenizer(text: str) -> Tokenizer:
    return Tokenizer("".join(sorted(set(text))))


def ids_of(text: str) -> np.ndarray:
    return np.array(tokenizer(text).encode(text), dtype=np.uint8)


def test_tokenizer_round_trip(corpus_path):
    text = corpus_path.read_text(encoding="utf-8")
    tok = tokenizer(text)
    sample = text[1000:3000]
    ids = tok.encode(sample)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == sample


def test_tokenizer_lists_unknown_characters():
    tok = tokenizer("hello world")
    with pytest.raises(UserError, match=r"characters not in the vocabulary: 'Z', 'x'"):
        tok.encode("hex Zx")


def test_batches_are_shifted_windows_of_the_split():
    """Train windows come from the first 90% of the text and val windows from the last 10%, each
    target the character after its input."""
    text = "".join(random.Random(0).choices(string.ascii_lowercase, k=5000))  # windows are unique
    tok = tokenizer(text)
    batches = Batches(ids_of(text), block_size=17, batch_size=5, device=torch.device("cpu"),
                      seed=3)
    for split, part in (("train", text[:4500]), ("val", text[4500:])):
        windows = torch.tensor(tok.encode(part)).unfold(0, 18, 1)  # (len(part) - 17, 18)
        x, y = batches.get(split)
        assert x.shape == y.shape == (5, 17)
        torch.testing.assert_close(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1):  # (5, 18): input and its last target
            assert (windows == row).all(dim=1).any(), (split, row)


def test_batches_are_reproducible_from_state():
    text = "abcdefghij" * 100
    a = Batches(ids_of(text), 8, 4, torch.device("cpu"), seed=1, streams=range(2))
    a.get("train", stream=1)
    state = a.state()
    expected = a.get("train", stream=1)[0], a.get("val")[0]
    b = Batches(ids_of(text), 8, 4, torch.device("cpu"), seed=99, streams=range(2))
    b.load_state(state)
    torch.testing.assert_close((b.get("train", stream=1)[0], b.get("val")[0]), expected)


def test_streams_do_not_depend_on_how_they_are_split():
    """Micro-batch stream m draws the same windows whether one process owns all the streams or
    each process owns one: the global batch is the same for any number of processes."""
    text = "".join(chr(ord("a") + i % 26) for i in range(3000))
    ids = ids_of(text)
    cpu = torch.device("cpu")
    together = Batches(ids, 8, 3, cpu, seed=5, streams=range(2))
    apart = [Batches(ids, 8, 3, cpu, seed=5, streams=[m]) for m in range(2)]
    for _ in range(3):
        for m in range(2):
            torch.testing.assert_close(together.get("train", m), apart[m].get("train", m))
    merged = Batches.merge_states([apart[0].state(), apart[1].state()])
    fresh = Batches(ids, 8, 3, cpu, seed=0, streams=range(2))
    fresh.load_state(merged)  # one process continuing what two processes left
    for m in range(2):
        torch.testing.assert_close(fresh.get("train", m), apart[m].get("train", m))
    assert not torch.equal(together.get("train", 0)[0], together.get("train", 1)[0])


def test_text_shorter_than_a_block_is_an_error():
    text = "abcdefghijklmnopqrstuvwxyz" * 4  # 104 chars: val split has 11
    with pytest.raises(UserError, match="text too short: 104 tokens leave 11 for the val split"
                                        ".*block_size \\+ 1 = 17"):
        Batches(ids_of(text), 16, 2, torch.device("cpu"), seed=0)


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_default_corpus_downloads_once_and_verifies(tmp_path, monkeypatch):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    calls = []
    monkeypatch.setattr(data.urllib.request, "urlopen",
                        lambda url, timeout: calls.append(url) or _FakeResponse(payload))
    path = data.default_corpus()
    assert path.read_bytes() == payload
    assert data.default_corpus() == path
    assert len(calls) == 1  # the second call used the cache


def test_default_corpus_rejects_bad_download_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(data.urllib.request, "urlopen",
                        lambda url, timeout: _FakeResponse(b"<html>rate limited</html>"))
    with pytest.raises(UserError, match="sha256"):
        data.default_corpus()
    assert list(tmp_path.iterdir()) == []


def test_default_corpus_offline_says_how_to_pass_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path))

    def offline(url, timeout):
        raise data.urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="--data FILE") as refused:
        data.default_corpus()
    assert list(tmp_path.iterdir()) == []
    # offline, a copy in the cache serves as well (it is checked by its sha256 like a download)
    assert (f"put a copy of it at {tmp_path / 'tinyshakespeare.txt'} (TINYGPT_CACHE sets that "
            "directory)") in str(refused.value)


@pytest.mark.parametrize("spec,tokens,ends", [
    ("0.9,0.1", 1_115_394, (1_003_854, 1_115_394, 1_115_394)),  # int(0.9 * n), as ever
    ("0.9,0.05,0.05", 1000, (900, 950, 1000)),
    ("90M,5M,5M", 10**8 + 7, (90 * 10**6, 95 * 10**6, 10**8)),  # enwik8's convention
    ("80,10,5", 100, (80, 90, 95)),
    ("1k,2K", 3000, (1000, 3000, 3000)),
])
def test_split_ends(spec, tokens, ends):
    assert split_ends(spec, tokens) == ends


def test_a_split_larger_than_the_corpus_is_refused():
    with pytest.raises(UserError, match=r"--split 90M,5M,5M takes 100,000,000 tokens but the "
                                        r"corpus has 99,999,999"):
        split_ends("90M,5M,5M", 10**8 - 1)


def test_batches_draw_from_the_parts_the_split_names():
    """Train from the first part, val from the second, never from the test part."""
    text = "a" * 500 + "b" * 250 + "c" * 250
    ids = ids_of(text)
    batches = Batches(ids, 8, 64, torch.device("cpu"), seed=0, split="0.5,0.25,0.25")
    assert set(torch.cat(batches.get("train", 0)).unique().tolist()) == {0}
    assert set(torch.cat(batches.get("val")).unique().tolist()) == {1}
