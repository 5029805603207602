"""The harness's own promise (tests/conftest.py): a child that hangs fails its test with the
stacks of every process it started, and leaves none of them running."""

import os
import sys
import time
from pathlib import Path

import pytest

HANG = """
import subprocess, sys, threading, time

def worker_thread_waits():
    threading.Event().wait()

def grandchild_waits():
    threading.Thread(target=worker_thread_waits, daemon=True).start()
    open(sys.argv[2], "w").write(str(__import__("os").getpid()))
    time.sleep(600)

def child_waits():
    subprocess.run([sys.executable, "-c", sys.argv[3], "grandchild", sys.argv[2]])

if sys.argv[1] == "grandchild":
    grandchild_waits()
else:
    child_waits()
"""


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds a process tree in /proc")
def test_a_hung_child_fails_with_the_stacks_of_its_processes(tmp_path, run_command):
    pid_file = tmp_path / "grandchild.pid"
    with pytest.raises(pytest.fail.Exception) as failure:
        run_command([sys.executable, "-c", HANG, "child", str(pid_file), HANG], timeout=5)
    message = str(failure.value)
    assert message.startswith(f"{[sys.executable, '-c', HANG, 'child', str(pid_file), HANG]} "
                              "still running after 5 s"), message[:300]
    for function in ("child_waits", "grandchild_waits", "worker_thread_waits"):
        assert f"in {function}" in message, message
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild)


def _worker_waits(rank: int, pid_dir: str) -> None:
    (Path(pid_dir) / f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(600)


def test_a_hung_spawned_job_fails_with_the_stacks_of_its_processes(tmp_path, spawn_job, capfd):
    """Each worker imports torch first (spawn), hence the longer timeout."""
    with pytest.raises(pytest.fail.Exception, match="_worker_waits still running in 2 processes "
                                                    "after 10 s"):
        spawn_job(_worker_waits, (str(tmp_path),), 2, timeout=10)
    assert capfd.readouterr().err.count("in _worker_waits") == 2
    assert not any(alive(int(p.read_text())) for p in tmp_path.glob("*.pid"))
