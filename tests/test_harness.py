"""The harness's own promises (tests/conftest.py): a child that hangs fails its test with the
stacks of every process it started, and leaves none of them running; a shuffled order keeps each
module's tests together and puts the slow ones first."""

import os
import sys
import time
from pathlib import Path

import conftest
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


class Item:
    """What `pytest_collection_modifyitems` reads of a collected test."""

    def __init__(self, path: str, name: str, slow: bool = False):
        self.path, self.name, self.slow, self.fixturenames = Path(path), name, slow, ()

    def get_closest_marker(self, name):
        return pytest.mark.slow if name == "slow" and self.slow else None

    def __repr__(self):
        return self.name


def ordered(items: list, seed: int | None) -> list:
    config = type("Config", (), {"getoption": staticmethod(lambda name: seed)})()
    items = list(items)
    conftest.pytest_collection_modifyitems(config, items)
    return items


def test_a_shuffled_order_keeps_each_modules_tests_together_and_the_slow_ones_first():
    """Interleaved modules would set their module-scoped fixtures up again at every switch."""
    items = [Item(f"tests/test_{m}.py", f"{m}{i}", slow=(m, i) == ("c", 3))
             for m in "abcdef" for i in range(8)]
    default = ordered(items, None)
    assert default == [items[19], *items[:19], *items[20:]]  # slow first, the rest as collected
    orders = {seed: ordered(items, seed) for seed in (1, 2, 3)}
    assert ordered(items, 1) == orders[1] and orders[1] != orders[2]
    for order in orders.values():
        assert order[0] is items[19] and sorted(order, key=items.index) == items
        modules = [item.path for item in order[1:]]
        assert sum(a != b for a, b in zip(modules, modules[1:])) == 5  # one run per module
        assert modules != sorted(modules)
        assert [item for item in order if item.path.stem == "test_a"] != items[:8]
