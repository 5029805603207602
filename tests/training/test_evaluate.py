"""Scoring a whole split (tinygpt/evaluate.py): every target once, with at least half a block of
context, whatever the batch size."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinygpt.config import ModelConfig
from tinygpt.evaluate import bits, score, windows
from tinygpt.model import build_model


@pytest.mark.parametrize("length,block", [(2, 8), (9, 8), (10, 8), (100, 8), (101, 7),
                                          (1000, 64), (65, 64), (17, 1)])
def test_windows_score_every_target_once_with_half_a_block_of_context(length, block):
    T = min(block, length - 1)
    scored = []
    for start, first in windows(length, block):
        assert 0 <= start and start + T <= length - 1 and 0 <= first < T
        targets = list(range(start + first + 1, start + T + 1))
        if start:  # after the first window, each target sees at least half a block before it
            assert first >= T // 2 or start + T == length - 1
            assert all(t - start >= (T + 1) // 2 for t in targets)
        scored += targets
    assert scored == list(range(1, length))


def test_a_bigram_scores_as_its_every_pair_whatever_the_batch():
    """A bigram's logits depend on one token only: the windows' sum is the plain sum over all
    neighbouring pairs."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="bigram", vocab_size=11, block_size=16))
    ids = np.random.default_rng(0).integers(0, 11, 1000).astype(np.uint8)
    x = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        expected = F.cross_entropy(model(x[None, :-1])[0][0], x[1:], reduction="sum").item()
    for batch in (1, 7, 1000):
        total, count = score(model, ids, 16, batch, torch.device("cpu"))
        assert count == 999 and total == pytest.approx(expected, rel=1e-6)


def test_a_transformer_scores_the_same_at_any_batch_size_and_in_eval_mode():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=13, block_size=12, n_layer=1, n_head=2,
                                    n_embd=8, dropout=0.5))
    ids = np.random.default_rng(1).integers(0, 13, 301).astype(np.uint8)
    model.train()
    runs = [score(model, ids, 12, batch, torch.device("cpu")) for batch in (1, 4, 64)]
    assert all(count == 300 for _, count in runs)
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6) == pytest.approx(runs[2][0],
                                                                                rel=1e-6)
    assert not model.training  # dropout off: the score is deterministic
    assert bits(math.log(2)) == pytest.approx(1.0)


def test_a_part_of_a_prepared_corpus_scores_as_that_part_alone(tmp_path):
    """`part` scores ids[lo:hi] of the whole corpus, read from its file as training reads it."""
    from tinygpt.corpus import load

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=256, block_size=12, n_layer=1, n_head=2,
                                    n_embd=8))
    path = tmp_path / "t.bin"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 500, dtype=np.uint8))
    ids = load(path, "bytes", tmp_path / "cache").ids
    assert isinstance(ids, np.memmap)
    alone = score(model, np.array(ids[123:400]), 12, 8, torch.device("cpu"))
    assert score(model, ids, 12, 8, torch.device("cpu"), part=(123, 400)) == alone
    assert alone[1] == 276
