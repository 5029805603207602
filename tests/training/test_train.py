"""Training end to end on tiny CPU models: the loss falls, resuming goes on exactly (and refuses
another model, optimizer or text), a stop request saves, a diverging run stops, and a new run
leaves an old one alone."""

import collections
import hashlib
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from runs import TINY, one_line_error, run_cli, tiny_run

from tinygpt import train as train_mod
from tinygpt.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.config import ModelConfig
from tinygpt.errors import UserError
from tinygpt.model import build_model
from tinygpt.train import train


def char_entropies(text: str) -> tuple[float, float]:
    """(unigram, bigram) entropy of text's characters in nats: the loss of the best predictor that
    sees no context, and of the best that sees the previous character."""
    n = len(text)
    counts = collections.Counter(text)
    pairs = collections.Counter(zip(text, text[1:]))
    unigram = -sum(c / n * math.log(c / n) for c in counts.values())
    bigram = -sum(c / (n - 1) * math.log(c / counts[a]) for (a, _), c in pairs.items())
    return unigram, bigram


def test_training_lowers_val_loss(tmp_path, corpus_path):
    """From ln(vocab) at init, 200 steps learn at least half of what the previous character can
    teach: val loss ends below the midpoint of the corpus's unigram and bigram entropies (tiny
    Shakespeare: 2.88, reached 2.70; the generated text: 2.66, reached 2.30)."""
    text = corpus_path.read_text(encoding="utf-8")
    unigram, bigram = char_entropies(text)
    summary = tiny_run(tmp_path, corpus_path, max_iters=200, eval_interval=100,
                       lr_decay_iters=200)
    first, last = summary["history"][0], summary["history"][-1]
    assert [h["iter"] for h in summary["history"]] == [0, 100, 200]
    assert abs(first["val"] - math.log(len(set(text)))) < 0.1
    assert last["val"] < (unigram + bigram) / 2, (unigram, bigram, summary["history"])
    assert (tmp_path / "out" / "best.pt").is_file() and (tmp_path / "out" / "last.pt").is_file()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, corpus_path, optimizer):
    schedule = dict(eval_interval=10, lr_decay_iters=30, dropout=0.1, optimizer=optimizer)
    full = tiny_run(tmp_path / "a", corpus_path, max_iters=30, **schedule)
    tiny_run(tmp_path / "b", corpus_path, max_iters=20, **schedule)
    assert load_checkpoint(tmp_path / "b" / "out" / "last.pt")["iteration"] == 20
    resumed = train("cpu-baby", {"max_iters": 30, "out_dir": str(tmp_path / "b" / "out")},
                    data=str(corpus_path), resume=True, log_interval=1000)
    assert resumed["steps"] == 10
    assert [(h["train"], h["val"]) for h in resumed["history"]] == [
        (h["train"], h["val"]) for h in full["history"][-1:]]
    a = load_checkpoint(tmp_path / "a" / "out" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "out" / "last.pt")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_keeps_its_optimizer(tmp_path, corpus_path, capsys):
    """A Muon run resumed with AdamW (or the other way) is refused in one line: the state of one
    is no start for the other. So is a Muon rate for a run of AdamW alone."""
    for optimizer in ("adamw", "muon"):
        tiny_run(tmp_path / optimizer, corpus_path, max_iters=2, eval_interval=2,
                 optimizer=optimizer)
    out = tmp_path / "muon" / "out"
    before = (out / "last.pt").read_bytes()
    rc, _, err = run_cli(capsys, "train", "--resume", "--out-dir", str(out), "--optimizer",
                         "adamw", "--max-iters", "4")
    one_line_error(rc, err, "--optimizer adamw differs from the checkpoint's muon; a resumed "
                             "run keeps the optimizer it was started with")
    assert (out / "last.pt").read_bytes() == before
    rc, _, err = run_cli(capsys, "train", "--resume", "--out-dir", str(tmp_path / "adamw" / "out"),
                         "--muon-lr", "0.01", "--max-iters", "4")
    one_line_error(rc, err, "--muon-lr applies to --optimizer muon only, and this run's "
                             "optimizer is adamw")
    rc, _, _ = run_cli(capsys, "train", "--resume", "--out-dir", str(out), "--muon-lr", "0.01",
                       "--optimizer", "muon", "--max-iters", "4")
    assert rc == 0 and load_checkpoint(out / "last.pt")["train_config"]["muon_lr"] == 0.01


def test_a_checkpoint_from_before_muon_resumes_as_it_would_have(tmp_path, corpus_path):
    """Format 1 held one AdamW's state where format 2 holds a dict of optimizers: written in
    the old layout, a run resumes exactly as from the new one."""
    tiny_run(tmp_path / "new", corpus_path, max_iters=4, eval_interval=2, optimizer="adamw")
    payload = torch.load(tmp_path / "new" / "out" / "last.pt", weights_only=True)
    payload.update(format_version=1, optimizer=payload["optimizer"]["adamw"])
    old = tmp_path / "old" / "out"
    old.mkdir(parents=True)
    torch.save(payload, old / "last.pt")
    runs = [train("cpu-baby", {"max_iters": 6, "out_dir": str(d)}, data=str(corpus_path),
                  resume=True, log_interval=1000) for d in (tmp_path / "new" / "out", old)]
    assert [(h["iter"], h["train"], h["val"]) for h in runs[0]["history"]] == [
        (h["iter"], h["train"], h["val"]) for h in runs[1]["history"]]
    for name, weight in runs[0]["model"].state_dict().items():
        assert torch.equal(weight, runs[1]["model"].state_dict()[name]), name


def test_resume_rejects_other_model_or_data(tmp_path, corpus_path):
    tiny_run(tmp_path, corpus_path, max_iters=2, eval_interval=1)
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match="n-layer 3 differs"):
        train("cpu-baby", {"out_dir": out, "n_layer": 3}, data=str(corpus_path), resume=True)
    digits = tmp_path / "digits.txt"  # a vocabulary of digits and a space, unlike any corpus's
    digits.write_text(" ".join(map(str, range(5000))), encoding="utf-8")
    with pytest.raises(UserError, match="digits.txt is not the text .*--new-data"):
        train("cpu-baby", {"out_dir": out}, data=str(digits), resume=True)
    with pytest.raises(UserError, match="different vocabulary"):
        train("cpu-baby", {"out_dir": out}, data=str(digits), resume=True, new_data=True)


def test_resume_finds_its_data_and_notices_a_change(tmp_path, corpus_path, monkeypatch):
    """A checkpoint names its text (its absolute path and sha256): --resume needs no --data, from
    any directory, and refuses a changed or missing text unless told otherwise."""
    text = tmp_path / "text.txt"
    text.write_bytes(corpus_path.read_bytes())
    monkeypatch.chdir(tmp_path)
    tiny_run(tmp_path, "text.txt", max_iters=2, eval_interval=2)  # --data given relative
    monkeypatch.chdir(tmp_path / "out")
    out = str(tmp_path / "out")
    assert train("cpu-baby", {"out_dir": out, "max_iters": 4}, resume=True,
                 log_interval=1000)["iterations"] == 4
    assert load_checkpoint(tmp_path / "out" / "last.pt")["data"] == {
        "path": str(text.resolve()), "sha256": hashlib.sha256(text.read_bytes()).hexdigest()}
    with text.open("a", encoding="utf-8") as f:  # more of the same characters
        f.write(corpus_path.read_text(encoding="utf-8")[:100])
    with pytest.raises(UserError, match="text.txt is not the text .*/out/last.pt was trained on "
                                        r"\(.*text.txt, sha256 [0-9a-f]{12}\.\.\.\); resume on "
                                        "that text, or pass --new-data"):
        train("cpu-baby", {"out_dir": out, "max_iters": 6}, resume=True)
    assert train("cpu-baby", {"out_dir": out, "max_iters": 6}, data=str(text), resume=True,
                 new_data=True, log_interval=1000)["iterations"] == 6
    text.unlink()
    with pytest.raises(UserError, match="was trained on .*text.txt, which is not there any more"):
        train("cpu-baby", {"out_dir": out, "max_iters": 8}, resume=True)


@pytest.mark.parametrize("how, words", [
    (["--threads", "2"], "(fp32, 2 threads)"),
    ([], "(fp32, 4, 3, 2 or 1 threads, whichever times faster (--threads N fixes the count))"),
    (["OMP_NUM_THREADS"], "(fp32, 2 threads)"),
])
def test_the_start_line_says_how_threads_are_chosen(tmp_path, capsys, corpus_path, monkeypatch,
                                                   how, words):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    if how == ["OMP_NUM_THREADS"]:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by OpenMP at start only: torch keeps 2
        how = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", *how,
                             "--data", str(corpus_path), "--device", "cpu", "--max-iters", "1",
                             "--n-layer", "1", "--eval-iters", "1", "--out-dir",
                             str(tmp_path / "out"))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err
    assert words in err


@pytest.mark.parametrize("machine, how, words", [
    ("no bf16", [], r"muon lr 0\.02 \(Newton-Schulz: 3 iterations in fp32, this CPU has no bf16 "
                    r"units \(AMX, AVX-512 BF16\); 0\.\d\dx the model's FLOPs a step\) \+ "
                    r"adamw lr 0\.003"),
    ("amx", ["--muon-ns-steps", "3"], r"\(Newton-Schulz: 3 iterations in bf16 on 1 thread, AMX; "
                                      r"one thread for the same results at any count; 0\.\d\dx"),
    ("no bf16", ["--n-embd", "512", "--n-head", "4", "--batch-size", "1"],
     r"in fp32, .*; \d+\.\d\dx the model's FLOPs a step; fewer with --muon-ns-steps, or "
     r"--optimizer adamw\)"),
])
def test_the_start_line_says_how_muon_runs_and_its_cost(tmp_path, capsys, corpus_path,
                                                        monkeypatch, machine, how, words):
    """Newton-Schulz's iterations, precision and why, and its FLOPs beside the model's, with a
    way out where they outnumber them (a wide model on short batches)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: machine == "amx")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", *how, "--data",
                         str(corpus_path), "--device", "cpu", "--max-iters", "1", "--n-layer", "1",
                         "--eval-iters", "1", "--threads", "1", "--out-dir", str(tmp_path / "out"))
    assert rc == 0, err
    assert re.search(words, err.splitlines()[0]), err


def test_nan_loss_stops_cleanly(tmp_path, corpus_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(corpus_path),
                         "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                         "--lr", "1e20", "--weight-decay", "0", "--warmup-iters", "0",
                         "--grad-clip", "0",
                         "--max-iters", "50", "--eval-interval", "25", "--eval-iters", "2",
                         "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    one_line_error(rc, err.strip().splitlines()[-1] + "\n", "not finite")
    assert load_checkpoint(tmp_path / "out" / "best.pt")["iteration"] == 0


def test_ctrl_c_finishes_the_step_saves_and_exits(tmp_path, corpus_path, spawn):
    """Through `python -m tinygpt`, as a user's Ctrl-C would arrive (SIGTERM: test_rundir.py)."""
    cmd = [sys.executable, "-m", "tinygpt", "train", "--preset", "cpu-baby",
           "--data", str(corpus_path), "--device", "cpu", "--n-layer", "1", "--n-embd", "32",
           "--max-iters", "100000", "--eval-interval", "100000", "--eval-iters", "1",
           "--log-interval", "1", "--out-dir", str(tmp_path / "out")]
    proc = spawn(cmd, stderr=subprocess.PIPE, text=True,  # even if SIGINT is ignored here
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:  # wait until training steps are running
        if "/100000 loss" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err
    assert load_checkpoint(tmp_path / "out" / "last.pt")["iteration"] >= 1


def test_interrupted_on_an_evaluation_step_resumes_exactly(tmp_path, corpus_path, monkeypatch):
    full = tiny_run(tmp_path / "a", corpus_path, max_iters=20, eval_interval=10, dropout=0.1)
    step = train_mod._Run.step

    def step_then_signal(run, it):  # a SIGTERM right after step 10
        loss = step(run, it)
        if it + 1 == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(train_mod._Run, "step", step_then_signal)
    stopped = tiny_run(tmp_path / "b", corpus_path, max_iters=20, eval_interval=10, dropout=0.1)
    assert stopped["interrupted_by"] == signal.SIGTERM and stopped["iterations"] == 10
    assert [h["iter"] for h in stopped["history"]] == [0]  # stopped before step 10's evaluation
    monkeypatch.undo()
    resumed = train("cpu-baby", {"out_dir": str(tmp_path / "b" / "out")}, data=str(corpus_path),
                    resume=True, log_interval=1000)
    assert [(h["iter"], h["val"]) for h in resumed["history"]] == [
        (h["iter"], h["val"]) for h in full["history"][1:]]
    a = load_checkpoint(tmp_path / "a" / "out" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "out" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_needs_the_training_state(tmp_path, corpus_path):
    vocab = "".join(sorted(set(corpus_path.read_text())))
    cfg = ModelConfig(vocab_size=len(vocab), block_size=16, n_layer=1, n_head=2, n_embd=16,
                      dropout=0.0)
    save_checkpoint(tmp_path / "last.pt", {"model_config": vars(cfg), "train_config": {},
                                           "iteration": 3, "model": build_model(cfg).state_dict(),
                                           "vocab": vocab})
    with pytest.raises(UserError, match="lacks the training state.*optimizer"):
        train("cpu-baby", {"out_dir": str(tmp_path)}, data=str(corpus_path), resume=True)


def test_a_new_run_does_not_clobber_an_old_one(tmp_path, corpus_path, capsys):
    tiny_run(tmp_path, corpus_path, max_iters=2, eval_interval=1)
    before = (tmp_path / "out" / "last.pt").read_bytes()
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(corpus_path),
                         "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    one_line_error(rc, err, "already holds a run (last.pt, best.pt, metrics.jsonl)")
    assert (tmp_path / "out" / "last.pt").read_bytes() == before
    (tmp_path / "out" / "last.pt").unlink()  # a best.pt alone is a run's result too
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(corpus_path),
                         "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    one_line_error(rc, err, "already holds a run (best.pt, metrics.jsonl)")
    summary = train("cpu-baby", {**TINY, "max_iters": 1, "eval_interval": 1,
                                 "out_dir": str(tmp_path / "out")},
                    data=str(corpus_path), overwrite=True)
    assert summary["iterations"] == 1
