"""Stopping on a signal: answered within a layer's time (in a step's forward or backward pass, or
in an evaluation), a consistent checkpoint that resumes exactly, SIGHUP like SIGTERM, a second
signal ending the process at once, and signals the process was told to ignore left ignored."""

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tinygpt import memory
from tinygpt.checkpoint import load_checkpoint
from tinygpt.cli import main
from tinygpt.model import MLP
from tinygpt.signals import StopRequest
from tinygpt.train import train

RUN = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, grad_accum=2,
           dropout=0.1, eval_iters=4, warmup_iters=5, max_iters=20, eval_interval=10,
           device="cpu", backend="torch")
LONG_RUN = ["--preset", "cpu-baby", "--device", "cpu", "--n-layer", "1", "--n-embd", "32",
            "--max-iters", "100000", "--eval-iters", "1"]


def run(out_dir, corpus, **kw) -> dict:
    return train("cpu-baby", {**RUN, "out_dir": str(out_dir), **kw}, data=str(corpus),
                 log_interval=1000)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_path):
    out = tmp_path_factory.mktemp("full")
    return run(out, corpus_path), load_checkpoint(out / "last.pt")["model"]


def signal_in_mlp(monkeypatch, training: bool, call: int, backward: bool = False):
    """SIGTERM to this process in the `call`-th MLP forward (counting from 0) in training or in
    evaluation mode, or when the backward pass reaches that MLP's output."""
    forward, calls = MLP.forward, itertools.count()

    def counted(self, x):
        out = forward(self, x)
        if self.training == training and next(calls) == call:
            if backward:
                out.register_hook(lambda grad: os.kill(os.getpid(), signal.SIGTERM))
            else:
                os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(MLP, "forward", counted)


# MLP calls in training mode: 2 in the trial step before training, then 4 a step (2 micro-batches
# of 2 layers); in evaluation mode, 16 an evaluation (2 splits of 4 batches of 2 layers).
STOPS = {
    "forward": (dict(training=True, call=2 + 13 * 4 + 2), 13),  # step 14, 2nd micro-batch
    "backward": (dict(training=True, call=2 + 13 * 4 + 3, backward=True), 13),
    "evaluation": (dict(training=False, call=16 + 5), 10),  # the evaluation at step 10
}


@pytest.mark.parametrize("where", STOPS)
def test_a_signal_inside_a_step_or_an_evaluation_resumes_exactly(
        tmp_path, corpus_path, monkeypatch, uninterrupted, where):
    """Stopped between two layers, the run saves the state from before the step (gradients
    dropped, data and dropout streams rewound) or the evaluation (its stream rewound), and
    resuming gives the uninterrupted run's evaluations and weights exactly."""
    full, full_weights = uninterrupted
    when, iteration = STOPS[where]
    signal_in_mlp(monkeypatch, **when)
    stopped = run(tmp_path, corpus_path)
    assert stopped["interrupted_by"] == signal.SIGTERM and stopped["iterations"] == iteration
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["iteration"] == iteration and ckpt["evaluated"] == (where != "evaluation")
    monkeypatch.undo()
    resumed = train("cpu-baby", {"out_dir": str(tmp_path)}, data=str(corpus_path), resume=True,
                    log_interval=1000)
    losses = [(h["iter"], h["train"], h["val"]) for h in stopped["history"] + resumed["history"]]
    assert losses == [(h["iter"], h["train"], h["val"]) for h in full["history"]]
    weights = load_checkpoint(tmp_path / "last.pt")["model"]
    assert all(torch.equal(weights[k], full_weights[k]) for k in full_weights)


def test_a_signal_before_the_first_step_writes_nothing(tmp_path, capsys, corpus_path,
                                                       monkeypatch):
    try_step = memory.try_step

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        try_step(*args)

    monkeypatch.setattr(memory, "try_step", signalled)
    out = tmp_path / "out"
    assert main(["train", *LONG_RUN, "--data", str(corpus_path), "--out-dir", str(out)]) == 143
    assert capsys.readouterr().err.endswith(
        "tinygpt: stopped by SIGTERM before the first step; nothing was written\n")
    assert not out.exists()


def start(spawn, argv: list[str], code: str | None = None) -> subprocess.Popen:
    """`tinygpt argv` (or the script `code` with argv), with SIGINT and SIGHUP handled as in a
    terminal whatever this process ignores, once its training steps run."""
    def default_handlers():
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)

    cmd = [sys.executable, *(["-c", code] if code else ["-m", "tinygpt"]), *argv]
    return spawn(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=default_handlers)


def wait_for(proc: subprocess.Popen, needle: str) -> None:
    """Read `proc`'s stderr up to the first line that holds `needle`."""
    for line in proc.stderr:
        if needle in line:
            return


def answer_to(proc: subprocess.Popen, sig: signal.Signals) -> str:
    """Send `sig`; `proc`'s remaining stderr once it has exited, which must be within 10 s."""
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, err
    return err


def test_sighup_in_a_long_first_evaluation_is_answered_within_seconds(tmp_path, corpus_path,
                                                                     spawn):
    """The first evaluation would take minutes: a closed terminal's SIGHUP stops it at once,
    and, the run having written nothing yet, it writes nothing (as before the first step); an
    earlier run's checkpoints that --overwrite was to replace stay as they were. (The bigram
    model has no layers to check between: the evaluation checks between its batches.)"""
    (tmp_path / "last.pt").write_bytes(b"an earlier run")
    proc = start(spawn, ["train", "--preset", "bigram", "--device", "cpu", "--eval-iters",
                         "100000", "--data", str(corpus_path), "--out-dir", str(tmp_path),
                         "--overwrite"])
    wait_for(proc, "tinygpt: preset")
    time.sleep(2)  # the trial step takes milliseconds: this is well inside the evaluation
    err = answer_to(proc, signal.SIGHUP)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert err.endswith("tinygpt: stopped by SIGHUP before the first step; nothing was "
                        "written\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tinygpt.lock", "last.pt"]
    assert (tmp_path / "last.pt").read_bytes() == b"an earlier run"


SAVE_HANGS = """
import sys, time
from tinygpt import checkpoint
from tinygpt.cli import main

real_save, saves = checkpoint.save_checkpoint, []

def save_that_hangs_after_two(path, payload):  # the first evaluation's two go through
    saves.append(path)
    if len(saves) > 2:
        time.sleep(300)
    real_save(path, payload)

checkpoint.save_checkpoint = save_that_hangs_after_two
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_signal_exits_at_once(tmp_path, corpus_path, spawn):
    """The first SIGTERM's save hangs; a second one ends the process without waiting for it,
    leaving the checkpoints written before intact."""
    proc = start(spawn, ["train", *LONG_RUN, "--eval-interval", "100000", "--log-interval", "1",
                         "--data", str(corpus_path), "--out-dir", str(tmp_path)], SAVE_HANGS)
    wait_for(proc, "/100000 loss")
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # a repeat within a second is taken for the same request
    err = answer_to(proc, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM again: exiting now, without saving" in err
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 0


def test_ignored_signals_stay_ignored():
    """nohup and background jobs start a process with signals ignored: a run respects that."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopRequest():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)
