"""benchmarks.bench_data's parts: the corpora it makes, its peak-RSS figure, the two data paths
it compares, and its verdicts."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from benchmarks import bench_data
from tinygpt.data import Batches


def test_a_made_corpus_has_the_size_asked_and_tiny_shakespeares_kind_of_text(tmp_path):
    path = tmp_path / "c.txt"
    bench_data.make_corpus(path, 123_457)
    text = path.read_text(encoding="utf-8")
    assert len(path.read_bytes()) == len(text) == 123_457 and text.isascii()
    assert len(set(text)) > 20 and text.count("\n") > 1000


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is Linux's")
def test_peak_rss_is_the_childs_own_not_its_parents(tmp_path):
    """This process holds torch (hundreds of MB); a child that allocates 300 MB reports about
    that, and one that allocates nothing reports far less than its parent."""
    grow = "import sys; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    _, small = bench_data.timed_process("-c", "pass", [], env)
    wall, big = bench_data.timed_process("-c", grow, [], env)
    assert small < 60 << 20 and 300 << 20 < big < 400 << 20 and wall > 0
    with pytest.raises(RuntimeError, match="exited 3"):
        bench_data.timed_process("-c", "raise SystemExit(3)", [], env)


def test_both_data_paths_give_the_same_windows():
    ids = np.random.default_rng(0).integers(0, 65, 5000).astype(np.uint8)
    cpu = torch.device("cpu")
    now = Batches(ids, 16, 4, cpu, seed=3, streams=range(2))
    before = bench_data.InMemoryBatches(ids, 16, 4, cpu, seed=3, streams=range(2))
    assert before.splits["train"].dtype == torch.int64
    for split, stream in [("train", 0), ("train", 1), ("val", -1)] * 3:
        for a, b in zip(now.get(split, stream), before.get(split, stream)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("later_1g, prepare_1g, step_ratio, verdicts", [
    (8.5, 30.0, 1.01, ["met", "met", "met", "met"]),
    (9.5, 30.0, 1.01, ["met", "MISSED", "met", "met"]),  # 1G 2.5 s over tiny Shakespeare
    (8.5, 70.0, 1.05, ["met", "met", "MISSED", "MISSED"]),
])
def test_the_report_judges_each_goal(tmp_path, later_1g, prepare_1g, step_ratio, verdicts):
    mib = 1 << 20
    started = {
        "tiny Shakespeare": {"later run": [(7.0, 430 * mib)] * 3},
        "100M": {"prepare": [(2.0, 60 * mib)], "first run": [(9.0, 440 * mib)],
                 "later run": [(7.5, 450 * mib)] * 3},
        "1G": {"prepare": [(prepare_1g, 60 * mib)], "first run": [(30.0, 500 * mib)],
               "later run": [(later_1g, 540 * mib), (later_1g, 540 * mib), (99.0, 540 * mib)]},
    }
    stepped = {bench_data.NOW: {"step": [10.0 * step_ratio], "batch": [50.0]},
               bench_data.BEFORE: {"step": [10.0], "batch": [48.0]}}
    bench_data._report(str(tmp_path), started, stepped, None, 3, 200, torch.device("cpu"), False)
    (result,) = tmp_path.glob("data-*.json")
    table = json.loads(result.read_text())
    found = [line.rsplit(": ", 1)[1] for line in table["notes"].splitlines()
             if line.startswith("- ") and ("goal" in line)]
    assert found == verdicts, table["notes"]
    assert table["rows"][2][:3] == ["1G", f"{prepare_1g:.2f}", "60"]
    assert table["rows"][2][-1] == f"{later_1g - 7.0:+.2f}"  # the median, not the slow round
    assert "not measured here" in table["notes"]
    assert "50.0 µs a batch against 48.0, +0.020% of a step" in table["notes"]
