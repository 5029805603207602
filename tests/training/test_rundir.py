"""One run per output directory: the lock a run holds, and temporary checkpoint files that belong
to the process writing them."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from tinygpt.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.cli import main
from tinygpt.errors import UserError
from tinygpt.rundir import LOCK_NAME, OutDirLock

HOLD = """
import sys
from tinygpt.rundir import OutDirLock
with OutDirLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def hold(spawn, out_dir) -> subprocess.Popen:
    """Another process holding `out_dir`'s lock until its stdin closes."""
    proc = spawn([sys.executable, "-c", HOLD, str(out_dir)], stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_run_is_refused_and_the_first_goes_on(tmp_path, capsys, corpus_path, spawn):
    """Two trainings on one --out-dir: the second, new or resumed, is refused in one line naming
    the first, which trains on unharmed and is stopped by SIGTERM with its checkpoint saved."""
    out = tmp_path / "out"
    args = ["--data", str(corpus_path), "--device", "cpu", "--out-dir", str(out)]
    first = spawn(
        [sys.executable, "-m", "tinygpt", "train", "--preset", "cpu-baby", *args, "--n-layer",
         "1", "--n-embd", "32", "--max-iters", "100000", "--eval-interval", "5",
         "--eval-iters", "1", "--log-interval", "1"], stderr=subprocess.PIPE, text=True)
    for line in first.stderr:  # past its second evaluation's checkpoints
        if line.startswith("step 5:"):
            break
    for extra in (["--preset", "cpu-baby"], ["--resume"], ["--preset", "cpu-baby", "--overwrite"]):
        capsys.readouterr()
        assert main(["train", *extra, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tinygpt: error: {out}/ is in use by another tinygpt run (pid "
                              f"{first.pid} on ") and err.count("\n") == 1, err
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "stopped by SIGTERM at iteration" in err
    assert load_checkpoint(out / "last.pt")["iteration"] >= 5
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "best.pt", "last.pt",
                                                     "metrics.jsonl"]


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path, spawn):
    holder = hold(spawn, tmp_path)
    with pytest.raises(UserError, match=rf"in use by another tinygpt run \(pid {holder.pid} on "
                                        r".*, started 20\d\d-"):
        with OutDirLock(tmp_path):
            pass
    holder.kill()  # SIGKILL: no chance to clean up, and still the lock goes with the process
    holder.wait()
    with OutDirLock(tmp_path):
        pass


def test_temporary_files_belong_to_their_process(tmp_path):
    """A save leaves other processes' temporary files alone; taking the lock, when no process can
    be writing, clears those a dead run left."""
    others = tmp_path / f".last.pt.{os.getpid() + 1}.x1y2.tmp"
    others.write_bytes(b"PK half a checkpoint")
    save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.ones(3)}})
    assert others.exists()
    with OutDirLock(tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "last.pt"]


def test_a_refused_run_leaves_no_directory_behind(tmp_path, capsys, corpus_path):
    out = tmp_path / "new" / "out"
    assert main(["train", "--preset", "cpu-baby", "--data", str(tmp_path / "missing.txt"),
                 "--device", "cpu", "--out-dir", str(out)]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_an_output_directory_that_cannot_be_made(tmp_path, capsys, corpus_path):
    (tmp_path / "file").write_text("not a directory")
    assert main(["train", "--preset", "cpu-baby", "--data", str(corpus_path), "--device", "cpu",
                 "--out-dir", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (f"tinygpt: error: cannot use output directory {tmp_path}/file/out/ (Not a "
                   "directory)\n")
