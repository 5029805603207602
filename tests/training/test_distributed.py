"""Data-parallel training on the CPU with gloo: two processes against one.

The launches here are the README's: `tinygpt torchrun --nproc_per_node=2 train ...`, torchrun
with tinygpt's checks and one-line errors (tests/cli/test_hostile.py runs plain torchrun too)."""

import gc
import json
import os
import socket
import sys

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from tinygpt import distributed
from tinygpt.checkpoint import load_checkpoint
from tinygpt.train import train

ARGS = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, grad_accum=2,
            dropout=0.0, eval_iters=2, lr=3e-3, warmup_iters=2, device="cpu", backend="torch",
            optimizer="muon")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_flags(values: dict) -> list[str]:
    """`--name value` for each entry but those that are None (left out)."""
    return [f for k, v in values.items() if v is not None
            for f in (f"--{k.replace('_', '-')}", str(v))]


def torchrun(run_command, nproc: int, corpus, out_dir, **overrides):
    """`tinygpt train` on the cpu-baby preset and ARGS in `nproc` processes."""
    cmd = [sys.executable, "-m", "tinygpt", "torchrun", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "train", "--preset", "cpu-baby", "--data", str(corpus),
           *cli_flags({**ARGS, "out_dir": out_dir, **overrides})]
    return run_command(cmd, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


def test_two_processes_match_one_and_resume_in_one(tmp_path, corpus_path, run_command):
    """Without --grad-accum each process takes one micro-batch: the global batch of two
    micro-batches that one process with --grad-accum 2 steps on."""
    proc = torchrun(run_command, 2, corpus_path, tmp_path / "two", max_iters=6, eval_interval=3,
                    grad_accum=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("tinygpt: preset") == 1  # only rank 0 speaks
    assert "| 2 processes x 1 micro-batch of 4 (global batch 8)" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".tinygpt.lock", "best.pt",
                                                                 "last.pt", "metrics.jsonl"]
    record = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert record[0]["processes"] == 2 and [r["kind"] for r in record].count("header") == 1
    assert [r["iter"] for r in record if r["kind"] == "eval"] == [0, 3, 6]  # rank 0's alone
    single = train("cpu-baby", {**ARGS, "max_iters": 6, "eval_interval": 3,
                                "out_dir": str(tmp_path / "one")}, data=str(corpus_path))
    two = load_checkpoint(tmp_path / "two" / "last.pt")
    assert two["iteration"] == 6 and two["train_config"]["grad_accum"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in two["model"])  # unwrapped
    assert_same_weights(two["model"], load_checkpoint(tmp_path / "one" / "last.pt")["model"])
    assert abs(two["best_val_loss"] - single["best_val_loss"]) < 1e-5

    # The two-process checkpoint continues in one process exactly as the one-process run does,
    # its evaluation batches drawn on from where rank 0's evaluations left off.
    resumed = train("cpu-baby", {"max_iters": 9, "out_dir": str(tmp_path / "two")},
                    data=str(corpus_path), resume=True)
    reference = train("cpu-baby", {"max_iters": 9, "out_dir": str(tmp_path / "one")},
                      data=str(corpus_path), resume=True)
    assert resumed["steps"] == reference["steps"] == 3
    assert_same_weights(resumed["model"].state_dict(), reference["model"].state_dict())
    (final,), (expected,) = resumed["history"], reference["history"]
    assert final["iter"] == expected["iter"] == 9
    assert final["val"] == pytest.approx(expected["val"], abs=1e-5)
    assert final["train"] == pytest.approx(expected["train"], abs=1e-5)


def _join_job(rank: int, port: int) -> None:
    """Make this process rank `rank` of a two-process job whose process group is destroyed
    only once no DDP wrapper is left: one let go of afterwards can hang the process at exit
    (see `distributed.stop`)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    stop = distributed.stop

    def checked_stop():
        alive = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]
        assert not alive, "a DDP wrapper outlives the process group"
        stop()

    distributed.stop = checked_stop


def _worker(rank: int, port: int, corpus: str, out_dir: str) -> None:
    _join_job(rank, port)
    summary = train("cpu-baby", {**ARGS, "max_iters": 5, "eval_interval": 5, "dropout": 0.1,
                                 "out_dir": out_dir}, data=corpus)
    torch.save(summary["model"].state_dict(), os.path.join(out_dir, f"rank{rank}.params"))


def test_every_rank_holds_identical_parameters(tmp_path, corpus_path, spawn_job):
    spawn_job(_worker, (free_port(), str(corpus_path), str(tmp_path)), 2, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.params", weights_only=True) for r in range(2)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert_same_weights(ranks[0], load_checkpoint(tmp_path / "last.pt")["model"], atol=0)


def _failing_worker(rank: int, port: int, corpus: str, out_dir: str) -> None:
    _join_job(rank, port)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a failed step")

    DistributedDataParallel.forward = forward  # the traceback's frames hold the wrapper
    with pytest.raises(RuntimeError, match="a failed step"):
        train("cpu-baby", {**ARGS, "max_iters": 5, "out_dir": out_dir}, data=corpus)


def test_a_step_that_fails_inside_ddp_lets_go_of_it_before_the_process_group(tmp_path,
                                                                              corpus_path,
                                                                              spawn_job):
    spawn_job(_failing_worker, (free_port(), str(corpus_path), str(tmp_path)), 2, timeout=120)


def test_grad_accum_must_divide_among_processes(tmp_path, corpus_path, run_command):
    proc = torchrun(run_command, 2, corpus_path, tmp_path, grad_accum=3)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("tinygpt: error: grad_accum (3) must be a multiple of the number "
                             "of processes (2)") == 1  # one rank speaks for all
