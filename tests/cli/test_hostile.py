"""Hostile checkpoints, environments and numbers (issue #41): each ends in one line naming the
problem, or does what was asked, and nothing written before is lost."""

import errno
import json
import os
import pickle
import re
import resource
import signal
import socket
import sys
import time
import warnings

import pytest
import torch

from tinygpt import checkpoint as ckpt_mod
from tinygpt import corpus, distributed
from tinygpt import generate as generate_mod
from tinygpt import train as train_mod
from tinygpt.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.cli import main
from tinygpt.data import cache_dir

TINY = ["--preset", "cpu-baby", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
        "--block-size", "16", "--batch-size", "4", "--eval-iters", "2", "--device", "cpu",
        "--backend", "torch", "--threads", "1", "--optimizer", "muon"]


def one_line(rc: int, err: str, needle: str) -> str:
    """The error line of a refused command, checked: status 2, one line, no traceback."""
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("tinygpt: error: ") and needle in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_path) -> dict:
    """The payload of a tiny run's last.pt after two steps: the state of both optimizers (Muon
    and AdamW) and every stream."""
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", *TINY, "--data", str(corpus_path), "--max-iters", "2",
                 "--eval-interval", "1", "--out-dir", str(out)]) == 0
    payload = torch.load(out / "last.pt", weights_only=True)
    del payload["format_version"]
    return payload


def hostile(trained: dict, out, change) -> bytes:
    """`trained` with `change(payload)` made, written to out/last.pt; returns its bytes."""
    optimizer = {name: {"state": {i: dict(s) for i, s in part["state"].items()},
                        "param_groups": part["param_groups"]}
                 for name, part in trained["optimizer"].items()}
    payload = {**trained, "optimizer": optimizer,
               "rng": {**trained["rng"], "batches": dict(trained["rng"]["batches"])}}
    change(payload)
    save_checkpoint(out / "last.pt", payload)
    return (out / "last.pt").read_bytes()


def _set(path: str, value):
    """A change that sets payload[k1][k2]... = value, for a dotted `path`."""
    *parents, last = path.split(".")

    def change(payload):
        target = payload
        for key in parents:
            target = target[int(key) if key.lstrip("-").isdigit() else key]
        target[int(last) if last.lstrip("-").isdigit() else last] = value
    return change


RESUMED = {
    "exp_avg of 3 elements": (_set("optimizer.adamw.state.0.exp_avg", torch.zeros(3)),
                              "(adamw: exp_avg of parameter 0 is (3,) float32; expected ("),
    "exp_avg as integers": (_set("optimizer.adamw.state.0.exp_avg",
                                 torch.zeros(3, dtype=torch.long)),
                            "(adamw: exp_avg of parameter 0 is (3,) int64; expected ("),
    "exp_avg_sq negative": (lambda p: p["optimizer"]["adamw"]["state"][1].update(
        exp_avg_sq=-p["optimizer"]["adamw"]["state"][1]["exp_avg_sq"] - 1),
        "exp_avg_sq of parameter 1 holds negative values"),
    "exp_avg not finite": (lambda p: p["optimizer"]["adamw"]["state"][2].update(
        exp_avg=p["optimizer"]["adamw"]["state"][2]["exp_avg"] * float("nan")),
        "exp_avg of parameter 2 holds non-finite values"),
    "step missing": (lambda p: p["optimizer"]["adamw"]["state"][0].pop("step"),
                     "parameter 0 has exp_avg, exp_avg_sq; expected exp_avg, exp_avg_sq, step"),
    "state of a parameter the model lacks": (_set("optimizer.adamw.state.999", {}),
                                             "(adamw: entry 999)"),
    "state of the parameter after the last": (lambda p: p["optimizer"]["adamw"]["state"].update(
        {sum(len(g["params"]) for g in p["optimizer"]["adamw"]["param_groups"]): {}}),
        "(adamw: entry 5)"),  # AdamW steps 5 parameters: 0 to 4
    "groups of another model": (_set("optimizer.adamw.param_groups", [{"params": [0, 1]}]),
                                "(adamw: its parameter groups are not this model's)"),
    "momentum of 3 elements": (_set("optimizer.muon.state.3.momentum_buffer", torch.zeros(3)),
                               "(muon: momentum_buffer of parameter 3 is (3,) float32; "
                               "expected (16, 64)"),
    "momentum not finite": (lambda p: p["optimizer"]["muon"]["state"][0].update(
        momentum_buffer=p["optimizer"]["muon"]["state"][0]["momentum_buffer"] / 0),
        "(muon: momentum_buffer of parameter 0 holds non-finite values)"),
    "AdamW's state for Muon's matrices": (_set("optimizer.muon.state.1", {
        "step": torch.tensor(2.0), "exp_avg": torch.zeros(16, 16),
        "exp_avg_sq": torch.zeros(16, 16)}),
        "(muon: parameter 1 has exp_avg, exp_avg_sq, step; expected momentum_buffer)"),
    "Muon's state missing": (lambda p: p["optimizer"].pop("muon"),
                             "optimizer state (it holds adamw; this run steps adamw, muon)"),
    "a part as a list": (_set("optimizer.muon", [1, 2]),
                         "(muon: not a dict of state and param_groups)"),
    "optimizer as a list": (_set("optimizer", [1, 2]),
                            "optimizer state (it holds list; this run steps adamw, muon)"),
    "torch stream of 3 bytes": (_set("rng.torch", [torch.zeros(3, dtype=torch.uint8)]),
                                "random-number state (torch: Expected a CPUGeneratorImplState"),
    "batch stream of 3 bytes": (_set("rng.batches.0", torch.zeros(3, dtype=torch.uint8)),
                                "random-number state (batch stream 0: Expected a"),
    "batch stream named by text": (_set("rng.batches.x", torch.zeros(3, dtype=torch.uint8)),
                                   "random-number state (batch stream 'x')"),
    "streams as a list": (_set("rng", [1]), "not the torch, cuda and batches streams"),
    "no CUDA streams entry": (lambda p: p["rng"].pop("cuda"),
                              "not the torch, cuda and batches streams"),
    "fewer CUDA streams than processes": (_set("rng.cuda", []),
                                          "random-number state (0 CUDA streams beside 1 torch "
                                          "stream)"),
    "a CUDA stream of text": (_set("rng.cuda", ["x"]),
                              "random-number state (cuda: not a generator's state)"),
    "best loss as text": (_set("best_val_loss", "x"), "malformed best_val_loss ('x')"),
    "best loss nan": (_set("best_val_loss", float("nan")), "malformed best_val_loss (nan)"),
    "best loss negative": (_set("best_val_loss", -1.0), "malformed best_val_loss (-1.0)"),
    "evaluated as text": (_set("evaluated", "yes"), "malformed evaluated flag ('yes')"),
}


_PROBE = """
import contextlib, io, json, sys, traceback
from tinygpt.cli import main
results = {}
for name, out_dir in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["train", "--resume", "--out-dir", out_dir, "--max-iters", "4"])
        except Exception:  # a traceback: that case's test fails, showing it
            rc = 1
            traceback.print_exc()
    results[name] = [rc, err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, trained, run_command) -> dict:
    """`train --resume` on each of RESUMED's checkpoints, in one fresh process: such a state
    used to crash the fused AdamW step (SIGSEGV, or an INTERNAL ASSERT), which must fail these
    tests, not end the test run. name -> (status, stderr, out_dir, the checkpoint's bytes)."""
    cases = {}
    for name, (change, _) in RESUMED.items():
        out = tmp_path_factory.mktemp("resumed")
        cases[name] = (out, hostile(trained, out, change))
    proc = run_command([sys.executable, "-c", _PROBE,
                        json.dumps({name: str(out) for name, (out, _) in cases.items()})],
                       timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    return {name: (*results[name], *cases[name]) for name in cases}


@pytest.mark.parametrize("name", RESUMED)
def test_hostile_training_state_is_refused_before_it_is_loaded(resumed, name):
    rc, err, out, before = resumed[name]
    line = one_line(rc, err, RESUMED[name][1])
    assert line.startswith(f"tinygpt: error: checkpoint {out / 'last.pt'} has a malformed ")
    assert line.endswith("; it cannot be resumed")
    assert (out / "last.pt").read_bytes() == before


def test_a_resumed_run_takes_its_optimizer_settings_from_its_options(tmp_path, trained):
    """The checkpoint gives the optimizer its per-parameter state only: a new --weight-decay or
    --beta2 takes effect, and the gains and biases stay undecayed."""
    hostile(trained, tmp_path, lambda payload: None)
    assert main(["train", "--resume", "--out-dir", str(tmp_path), "--max-iters", "3",
                 "--weight-decay", "0.5", "--beta2", "0.95"]) == 0
    saved = load_checkpoint(tmp_path / "last.pt")["optimizer"]
    groups = saved["adamw"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert {g["betas"] for g in groups} == {(0.9, 0.95)}
    assert [g["weight_decay"] for g in saved["muon"]["param_groups"]] == [0.5]


JOBS = {
    "no address": ({}, "RANK and WORLD_SIZE describe a job of several processes, but "
                       "MASTER_ADDR and MASTER_PORT are not set: launch with `tinygpt torchrun`"),
    "no port": ({"MASTER_ADDR": "127.0.0.1"}, "but MASTER_PORT is not set"),
    "port past 16 bits": ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
                          "MASTER_PORT='99999' is not a TCP port (1 to 65535)"),
    "an address that does not resolve": (
        {"MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29500"},
        "MASTER_ADDR='no-such-host.invalid' is not an address this machine can reach ("),
    "world size past 64 bits": ({"WORLD_SIZE": str(10**21)},
                                f"WORLD_SIZE={10**21}, LOCAL_RANK=0 do not describe a process"),
}


@pytest.mark.parametrize("environ,needle", JOBS.values(), ids=JOBS.keys())
def test_a_job_the_environment_cannot_form(tmp_path, capsys, corpus_path, monkeypatch, environ,
                                           needle):
    """RANK and WORLD_SIZE set by hand, without torchrun: a traceback from torch's rendezvous
    (or an overflow inside it) before."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", **environ}.items():
        monkeypatch.setenv(name, value)
    rc = main(["train", *TINY, "--data", str(corpus_path), "--out-dir", str(tmp_path / "out")])
    one_line(rc, capsys.readouterr().err, needle)


def test_a_process_that_never_comes_is_waited_for_aloud_and_given_up_on(tmp_path, capsys,
                                                                        corpus_path,
                                                                        monkeypatch):
    """Rank 0 of two, alone: it says what it waits for, and ends after --join-timeout (this
    waited silently for torch's 30 minutes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setattr(distributed, "WAIT_NOTICE_S", 0.2)
    started = time.monotonic()
    rc = main(["train", *TINY, "--data", str(corpus_path), "--out-dir", str(tmp_path / "out"),
               "--join-timeout", "2"])
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (f"tinygpt: waiting for the 2 processes of the job to meet at "
                      f"127.0.0.1:{port} (giving up after 2 s; --join-timeout S)")
    one_line(rc, err[-1], f"the 2 processes of the job did not all meet at 127.0.0.1:{port} "
                          "within 2 s (")
    assert not (tmp_path / "out" / "last.pt").exists()


def test_a_first_checkpoint_that_cannot_be_written_says_none_was(tmp_path, capsys, corpus_path):
    """A full disk (RLIMIT_FSIZE: the kernel refuses the write with EFBIG, as a full disk does
    with ENOSPC) at a new run's very first checkpoint: there was no previous one to keep. The
    corpus is prepared first: a generated one is larger than the limit."""
    corpus.load(corpus_path, "chars", cache_dir() / "corpora")
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        rc = main(["train", *TINY, "--data", str(corpus_path), "--out-dir", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    one_line(rc, last, f"could not write checkpoint {out / 'best.pt'} (File too large); no "
                       "checkpoint was written there")
    assert not out.exists()  # the directory the run made goes with it: no debris


def test_a_torn_zip_index_reads_as_damage(tmp_path, capsys, monkeypatch):
    """A truncation that leaves the zip reader seeking past the end (EINVAL) is damage to the
    file, not a file that cannot be read."""
    (tmp_path / "best.pt").write_bytes(b"PK")

    def torn(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(ckpt_mod.torch, "load", torn)
    rc = main(["sample", "--ckpt", str(tmp_path / "best.pt"), "--device", "cpu"])
    one_line(rc, capsys.readouterr().err, "is corrupt or truncated (its zip index points past")


class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo this must never run",)


def test_a_malicious_pickle_is_one_line_and_no_warning(tmp_path, capsys):
    """A plain pickle (protocol 4) that would run code: torch warns about its protocol before it
    refuses; the user sees only the refusal."""
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"x": _RunsCode()}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["sample", "--ckpt", str(path), "--device", "cpu"])
    out, err = capsys.readouterr()
    one_line(rc, err, f"checkpoint {path} ")
    assert caught == [] and "never run" not in out


def test_sample_says_what_it_samples_and_answers_running_out_of_memory(tmp_path, capsys,
                                                                       trained, monkeypatch):
    hostile(trained, tmp_path, lambda payload: None)
    path = tmp_path / "last.pt"
    rc = main(["sample", "--ckpt", str(path), "--max-new-tokens", "5", "--device", "cpu",
               "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 0
    assert re.search(rf"^tinygpt: sampling {re.escape(str(path))} \(iteration 2, val loss "
                     r"\d\.\d{4}\) \| gpt [\d,]+ params \| device cpu \(fp32, 1 thread\) \| "
                     r"backend torch \| cache shift$", err, re.M), err

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 512000000000 bytes")

    monkeypatch.setattr(generate_mod, "generate", out_of_memory)
    rc = main(["sample", "--ckpt", str(path), "--device", "cpu", "--threads", "1"])
    one_line(rc, capsys.readouterr().err.splitlines()[-1] + "\n",
             "out of memory on cpu while sampling; the key/value cache holds 16 positions of "
             "every layer; --cache off keeps none, or sample on a --device with more memory "
             "(nothing was written)")


def test_a_new_run_stopped_in_its_first_evaluation_writes_nothing(tmp_path, capsys,
                                                                  corpus_path, monkeypatch):
    """As the README says of a signal before the first step: the run had written nothing."""
    estimate = train_mod.estimate_loss

    def interrupted(model, batches, eval_iters, autocast, before_batch, timed):
        def before(done, total):
            if done == 1:
                os.kill(os.getpid(), signal.SIGINT)
            before_batch(done, total)
        return estimate(model, batches, eval_iters, autocast, before, timed)

    monkeypatch.setattr(train_mod, "estimate_loss", interrupted)
    out = tmp_path / "out"
    rc = main(["train", *TINY, "--data", str(corpus_path), "--out-dir", str(out)])
    assert rc == 130
    assert capsys.readouterr().err.endswith(
        "tinygpt: stopped by SIGINT before the first step; nothing was written\n")
    assert not out.exists()


def test_the_progress_line_says_when_its_speed_comes(tmp_path, capsys, corpus_path):
    """The first report has no speed yet: it says so, not 'warming up' (read as the learning
    rate's warm-up); the start line counts a small model's parameters, not '0.00M'."""
    assert main(["train", *TINY, "--data", str(corpus_path), "--max-iters", "20",
                 "--out-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "[##########..........] 10/20 loss " in err and "ms/iter from the next report" in err
    assert "warming up" not in err and "0.00M" not in err
    assert re.search(r"\| gpt [\d,]+ params \|", err), err


def test_torchrun_through_tinygpt_ends_a_failed_job_in_one_line(tmp_path, run_command):
    """Both processes fail to find the data: rank 0 says so once, and torchrun's failure report
    and ChildFailedError traceback do not follow."""
    proc = run_command([sys.executable, "-m", "tinygpt", "torchrun", "--nproc_per_node=2",
                        "train", *TINY[:-2], "--data", str(tmp_path / "missing.txt"),
                        "--out-dir", str(tmp_path / "out")],
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    one_line(proc.returncode, proc.stderr,
             f"data file not found: {tmp_path / 'missing.txt'}")


def test_a_usage_mistake_under_plain_torchrun_is_said_once(tmp_path, run_command):
    """Every process meets the same mistake: rank 0 speaks, the other waits and is stopped."""
    proc = run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "-m", "tinygpt", "train", "--frobnicate"], timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert proc.stderr.count("tinygpt: error: unrecognized arguments: --frobnicate (see "
                             "`tinygpt train --help`)") == 1, proc.stderr
    assert proc.stderr.count("tinygpt: error") == 1, proc.stderr


def test_torchrun_help_is_torchruns(capsys):
    assert main(["torchrun", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: tinygpt torchrun [-h] [--nnodes NNODES]")



@pytest.mark.parametrize("launcher", [
    ["--nproc-per-node", "2", "--log-dir", "train"],  # `train` as an option's value
    ["--standalone", "--nproc-per-node=2"],  # a flag right before `train`
    ["--nproc-per-node", "2"],
])
def test_torchrun_runs_train_with_its_options_whatever_torchruns_are(monkeypatch, launcher):
    import torch.distributed.run as torchrun

    ran = []
    monkeypatch.setattr(torchrun, "run", ran.append)
    job = ["train", "--max-iters", "3", "--out-dir", "train"]
    assert main(["torchrun", *launcher, *job]) == 0
    (options,) = ran
    assert (options.nproc_per_node, options.module, options.training_script,
            options.training_script_args) == ("2", True, "tinygpt", job)
    assert options.log_dir == ("train" if "--log-dir" in launcher else None)
    assert options.standalone == ("--standalone" in launcher)


def test_torchrun_refuses_a_program_of_its_own(capsys):
    assert main(["torchrun", "--nproc-per-node=2", "script.py", "train"]) == 2
    one_line(2, capsys.readouterr().err, "tinygpt torchrun runs `train`, not 'script.py'")
