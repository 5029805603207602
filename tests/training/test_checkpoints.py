"""Checkpoints: a round trip gives the same model, writes are atomic and durable (a full disk or
a kill mid-write keeps the previous file), and damaged, foreign or mismatched files are refused in
one line."""

import os
import resource
import signal
import stat
import sys

import pytest
import torch
from runs import one_line_error, run_cli, tiny_run

from tinygpt import checkpoint as ckpt_mod
from tinygpt.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.config import ModelConfig
from tinygpt.errors import UserError
from tinygpt.model import build_model
from tinygpt.train import train


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = build_model(cfg)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model_config": vars(cfg), "train_config": {}, "iteration": 7,
                           "model": model.state_dict(), "vocab": "abcdefghijk"})
    loaded = load_checkpoint(path)
    clone = build_model(ModelConfig(**loaded["model_config"]))
    clone.load_state_dict(loaded["model"])
    idx = torch.randint(0, 11, (2, 16))
    assert torch.equal(model(idx)[0], clone(idx)[0])
    assert loaded["iteration"] == 7


def test_checkpoint_bytes_reach_the_disk_before_its_name(tmp_path, monkeypatch):
    """The whole temporary file is flushed and fsynced, then renamed, then the directory synced:
    a crash at any moment leaves the old checkpoint or the complete new one."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append("fsync dir" if stat.S_ISDIR(info.st_mode) else ("fsync", info.st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.getsize(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "ck.pt", {"model": {"w": torch.randn(10_001)}})
    size = (tmp_path / "ck.pt").stat().st_size
    assert events == [("fsync", size), ("rename", size), "fsync dir"]


def test_corrupt_and_truncated_checkpoints(tmp_path, corpus_path, capsys):
    tiny_run(tmp_path, corpus_path, max_iters=1, eval_interval=1)
    good = (tmp_path / "out" / "best.pt").read_bytes()
    cases = {"truncated.pt": good[: len(good) // 2], "garbage.pt": os.urandom(4096),
             "missing.pt": None}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        rc, _, err = run_cli(capsys, "sample", "--ckpt", str(tmp_path / name), "--device", "cpu")
        one_line_error(rc, err, "not found" if content is None else "corrupt or truncated")


def test_checkpoint_from_newer_format(tmp_path):
    path = tmp_path / "new.pt"
    save_checkpoint(path, {"model_config": {}, "train_config": {}, "model": {}, "iteration": 0,
                           "vocab": "ab"})
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = ckpt_mod.FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(UserError, match="newer"):
        load_checkpoint(path)


def test_checkpoint_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model_config": {}, "train_config": {}, "model": {},
                "iteration": 0, "vocab": "ab", "payload": os.system}, path)
    with pytest.raises(UserError, match=r"holds an object tinygpt does not load \(posix.system\)"):
        load_checkpoint(path)


def test_a_full_disk_keeps_the_previous_checkpoints(tmp_path, capsys, corpus_path):
    """Files may not grow past a third of a checkpoint (RLIMIT_FSIZE: the kernel refuses the
    write with EFBIG, as a full disk does with ENOSPC): the save fails in one line naming the
    file and the reason, and the checkpoints before are untouched, with no debris beside them."""
    tiny_run(tmp_path, corpus_path, max_iters=2, eval_interval=2)
    out = tmp_path / "out"
    before = {name: (out / name).read_bytes() for name in ("best.pt", "last.pt")}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before["last.pt"]) // 3, hard))
    try:
        rc, _, err = run_cli(capsys, "train", "--resume", "--max-iters", "4", "--out-dir",
                             str(out))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    last_line = err.strip().splitlines()[-1]
    one_line_error(rc, last_line, f"could not write checkpoint {out}/")
    assert last_line.endswith(".pt (File too large); the previous checkpoint there is unchanged")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == [".tinygpt.lock", "best.pt", "last.pt",
                                                     "metrics.jsonl"]


KILL_MID_WRITE = """
import os, signal, sys
import torch
from tinygpt import checkpoint
from tinygpt.cli import main

writes = 0
real_save = torch.save

def crash_on_third_write(obj, f):
    # Evaluation at step 0 writes best.pt and last.pt; the third write, at step 5, is torn:
    # some bytes reach the temporary file, then the process dies as if the machine went down.
    global writes
    writes += 1
    if writes < 3:
        return real_save(obj, f)
    f.write(b"PK partial zip")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.torch.save = crash_on_third_write
main(["train", "--preset", "cpu-baby", "--data", sys.argv[1], "--out-dir", sys.argv[2],
      "--device", "cpu", "--n-layer", "1", "--n-embd", "32", "--max-iters", "10",
      "--eval-interval", "5", "--eval-iters", "1"])
"""


def test_training_killed_while_writing_keeps_the_previous_checkpoint(tmp_path, corpus_path,
                                                                      run_command):
    out = tmp_path / "out"
    proc = run_command([sys.executable, "-c", KILL_MID_WRITE, str(corpus_path), str(out)],
                       timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "step 5:" in proc.stderr  # it died writing the second evaluation's checkpoint
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the torn temporary file
    assert load_checkpoint(out / "last.pt")["iteration"] == 0  # the previous one, intact
    resumed = train("cpu-baby", {"out_dir": str(out)}, data=str(corpus_path), resume=True,
                    log_interval=1000)
    assert resumed["iterations"] == 10  # and training goes on from it
    assert sorted(p.name for p in out.iterdir()) == [".tinygpt.lock", "best.pt", "last.pt",
                                                     "metrics.jsonl"]  # debris cleared


def test_checkpoint_vocabulary_must_match_its_embedding(tmp_path, capsys, corpus_path):
    tiny_run(tmp_path, corpus_path, max_iters=1, eval_interval=1)
    path = tmp_path / "out" / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["vocab"] = ckpt["vocab"][:-1]  # one character short of the embedding's rows
    torch.save(ckpt, path)
    rc, _, err = run_cli(capsys, "sample", "--ckpt", str(path), "--device", "cpu")
    one_line_error(rc, err, "characters in its vocabulary but a model built for")


def test_checkpoint_whose_weights_do_not_fit_its_config(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    state = build_model(cfg).state_dict()
    # the stored config claims a layer the weights lack, then lacks a layer they hold
    for n_layer, needle in ((3, "missing blocks.2."), (1, "unexpected blocks.1.")):
        save_checkpoint(tmp_path / "best.pt", {"model_config": {**vars(cfg), "n_layer": n_layer},
                                               "train_config": {}, "iteration": 0,
                                               "model": state, "vocab": "abcdefghijk"})
        rc, _, err = run_cli(capsys, "sample", "--out-dir", str(tmp_path), "--prompt", "a",
                             "--device", "cpu")
        one_line_error(rc, err, f"weights do not fit the model its config describes ({needle}")
    save_checkpoint(tmp_path / "best.pt", {"model_config": {"n_layers": 2}, "train_config": {},
                                           "iteration": 0, "model": state, "vocab": "ab"})
    rc, _, err = run_cli(capsys, "sample", "--out-dir", str(tmp_path), "--device", "cpu")
    one_line_error(rc, err, "unreadable model_config")
