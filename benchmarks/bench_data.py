"""`python -m benchmarks.bench_data`: the data path (issue 55) on corpora of 10 MB, 100 MB and
1 GB, made here and removed after, and on tiny Shakespeare.

    python -m benchmarks.bench_data [--sizes 10M,100M,1G] [--rounds 3] [--quick] [--out DIR]

Starts (one table): every figure comes from a fresh process, as a user starts one, timed from
its launch to its exit, with its peak RSS from the kernel (`wait4`):
- prepare: `tinygpt.corpus.load` into an empty cache (two streaming passes: hash and vocabulary,
  then the ids);
- first run / later run: `tinygpt train --preset cpu-baby --max-iters 1 --eval-iters 1
  --threads 1` (issue 55's measure) with the cache empty, then with the corpus prepared;
- tiny Shakespeare's later run, timed in the same rounds, is what the goals compare with.
Steps (a second table): cpu-baby's training step (batch, forward, backward, Muon) on tiny
Shakespeare with batches read from the prepared copy, against the same windows from an int64
tensor on the device (the path before issue 55), interleaved; and on CUDA, the device memory the
data holds besides the batch in flight.

A corpus of a given size is tiny Shakespeare's lines in a seeded random order, over and over
(generated text when the shared copy is not beside the checkout): the same 65 characters, so
that only the size changes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import (
    SHARED_CORPUS,
    Interruptible,
    add_out_argument,
    environment,
    markdown_table,
    write_report,
)
from tinygpt.config import from_preset
from tinygpt.corpus import load
from tinygpt.data import Batches
from tinygpt.model import build_model
from tinygpt.optim import make_optimizer

SIZES = {"10M": 10**7, "100M": 10**8, "1G": 10**9}
GOALS = {"1G": 2.0, "100M": 1.0}  # a later run's seconds over tiny Shakespeare's, at most
PREPARE_GOAL = (60.0, 1 << 30)  # 1 GB: seconds and bytes of peak RSS, at most
STEP_GOAL = 1.02  # ms/step from the map over ms/step from the tensor, at most
RUN_TIMEOUT_S = 900
NOW, BEFORE = "prepared copy, read a window at a time (now)", "int64 tensor on the device (before)"
PREPARE = ("import sys; from pathlib import Path; from tinygpt.corpus import load; "
           "load(sys.argv[1], 'chars', Path(sys.argv[2]))")


def make_corpus(path: Path, size: int, seed: int = 0) -> None:
    """`size` bytes of tiny Shakespeare's lines in a seeded random order, written a few MB at a
    time."""
    rng = random.Random(seed)
    if SHARED_CORPUS.is_file():
        lines = SHARED_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    else:
        words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 9)))
                 for _ in range(5000)]
        lines = [" ".join(rng.choices(words, k=rng.randint(3, 12))) + "\n" for _ in range(40_000)]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            rng.shuffle(lines)
            block = "".join(lines)[:size - written]  # ASCII: a character a byte
            f.write(block)
            written += len(block)


# Runs `-m MODULE ARGS` or `-c CODE ARGS` and says its peak RSS as it exits. The kernel's own
# figure for a child (wait4's ru_maxrss) would count this big parent, whose memory the child
# shares between fork and exec; VmHWM is the peak of the child's own memory after exec.
PEAK_RSS = """import atexit, runpy, sys
def peak():
    with open('/proc/self/status') as f:
        kb = [line.split()[1] for line in f if line.startswith('VmHWM:')]
    print('peak-rss-kb', *kb, file=sys.stderr)
atexit.register(peak)
how, what = sys.argv[1:3]
sys.argv = [how if how == '-c' else what, *sys.argv[3:]]  # as python itself would set it
if how == '-m':
    runpy.run_module(what, run_name='__main__', alter_sys=True)
else:
    exec(what)
"""


def timed_process(how: str, what: str, args: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Runs `python how what args` (`-m module` or `-c code`) to its end: its wall time (s) and
    peak RSS (bytes). A failure is an error."""
    command = [sys.executable, "-c", PEAK_RSS, how, what, *args]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=RUN_TIMEOUT_S)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{how} {what} {' '.join(args)} exited {proc.returncode}: "
                           f"{proc.stderr[-2000:]}")
    kb = proc.stderr.rsplit("peak-rss-kb", 1)[1].split()
    if not kb:
        raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")
    return wall, int(kb[0]) * 1024


def train_run(data: Path, out_dir: Path, env: dict[str, str]) -> tuple[float, int]:
    return timed_process("-m", "tinygpt", [
        "train", "--preset", "cpu-baby", "--data", str(data), "--max-iters", "1", "--eval-iters",
        "1", "--threads", "1", "--device", "cpu", "--out-dir", str(out_dir), "--overwrite"], env)


def starts(sizes: list[str], rounds: int, work: Path, shakespeare: Path) -> dict:
    """name -> measure -> [(wall s, peak RSS bytes)] over the rounds, the sizes interleaved."""
    results: dict[str, dict[str, list]] = {name: {} for name in ["tiny Shakespeare", *sizes]}
    corpora = {"tiny Shakespeare": shakespeare}
    for name in sizes:
        corpora[name] = work / f"corpus-{name}.txt"
        print(f"making a {name} corpus", flush=True)
        make_corpus(corpora[name], SIZES[name])
    env = {**os.environ}
    for r in range(rounds):
        for name, path in corpora.items():
            cache = work / f"cache-{name}-{r}"
            env["TINYGPT_CACHE"] = str(cache)
            got = results[name]
            if name != "tiny Shakespeare":
                got.setdefault("prepare", []).append(timed_process(
                    "-c", PREPARE, [str(path), str(cache / "corpora")], env))
                _clear(cache)
                got.setdefault("first run", []).append(train_run(path, work / "out", env))
            else:
                train_run(path, work / "out", env)  # prepares it
            got.setdefault("later run", []).append(train_run(path, work / "out", env))
            _clear(cache)
            print(f"round {r + 1}/{rounds} {name}: "
                  + ", ".join(f"{m} {v[-1][0]:.2f} s {v[-1][1] / 2**20:,.0f} MiB"
                              for m, v in got.items()), flush=True)
    return results


def _clear(cache: Path) -> None:
    subprocess.run(["rm", "-rf", str(cache)], check=True)


class InMemoryBatches(Batches):
    """The path before issue 55: the whole corpus an int64 tensor on the device, windows cut
    from it by indexing; the same random streams, so the same windows."""

    def __init__(self, ids: np.ndarray, block_size: int, batch_size: int,
                 device: torch.device, seed: int, streams=range(1)):
        super().__init__(ids, block_size, batch_size, device, seed, streams)
        self.splits = {name: torch.from_numpy(np.asarray(ids[lo:hi], dtype=np.int64)).to(device)
                       for name, (lo, hi) in self.bounds.items()}  # (N,) each
        self.arange = torch.arange(block_size + 1, device=device)  # (T+1,)

    def get(self, split: str, stream: int = Batches.EVAL_STREAM):
        data = self.splits[split]
        starts = torch.randint(len(data) - self.block_size, (self.batch_size,),
                               generator=self.generators[stream]).to(self.device)  # (B,)
        windows = data[starts[:, None] + self.arange]  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


def step_times(shakespeare: Path, cache: Path, steps: int, rounds: int,
               device: torch.device, block: int = 10) -> dict:
    """ms/step of cpu-baby's training step with each data path, `steps` a round in blocks of
    `block` that alternate between the paths (a drifting machine slows both alike), and µs/batch
    of each path's batches alone; the same windows from both (checked)."""
    ids = load(shakespeare, "chars", cache).ids
    model_cfg, cfg = from_preset("cpu-baby", device=device.type)
    model_cfg.vocab_size = 65
    paths = {NOW: Batches, BEFORE: InMemoryBatches}
    made = {name: kind(ids, model_cfg.block_size, cfg.batch_size, device, cfg.seed)
            for name, kind in paths.items()}
    first = [made[name].get("train", 0) for name in paths]
    assert all(torch.equal(a, b) for a, b in zip(first[0], first[1])), "different windows"
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    times: dict[str, dict[str, list[float]]] = {name: {"step": [], "batch": []} for name in paths}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(steps // 5):  # warm
        _step(model, optimizer, *made[NOW].get("train", 0))
    for r in range(rounds):
        for b in range(max(steps // block, 1)):
            for name in paths if (r + b) % 2 == 0 else reversed(paths):
                sync()
                start = time.perf_counter()
                for _ in range(block):
                    _step(model, optimizer, *made[name].get("train", 0))
                sync()
                times[name]["step"].append((time.perf_counter() - start) / block * 1e3)
        for name in paths:
            start = time.perf_counter()
            for _ in range(steps * 10):
                made[name].get("train", 0)
            sync()
            times[name]["batch"].append((time.perf_counter() - start) / (steps * 10) * 1e6)
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {statistics.median(t['step']):.2f} ms/step {t['batch'][-1]:.1f} µs/batch"
            for n, t in times.items()), flush=True)
    return times


def _step(model, optimizer, x, y) -> None:
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def device_bytes(shakespeare: Path, cache: Path, device: torch.device) -> dict[str, int]:
    """CUDA memory each data path holds once built, a batch drawn and let go."""
    ids = load(shakespeare, "chars", cache).ids
    held = {}
    for name, kind in ((NOW, Batches),
                       (BEFORE, InMemoryBatches)):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        batches = kind(ids, 64, 12, device, 1337)
        batches.get("train")
        torch.cuda.synchronize()
        held[name] = torch.cuda.memory_allocated() - before
        del batches
    return held


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10M,100M,1G",
                        help="corpus sizes, of " + ", ".join(SIZES) + " (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measure")
    parser.add_argument("--steps", type=int, default=200, help="training steps a block")
    parser.add_argument("--quick", action="store_true",
                        help="10M only, one round, 20 steps: a check that it runs")
    parser.add_argument("--workdir", help="where the corpora are made (default: a temporary "
                                          "directory; 1G needs 2 GB free there)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    sizes = ["10M"] if args.quick else args.sizes.split(",")
    if bad := [s for s in sizes if s not in SIZES]:
        parser.error(f"unknown sizes {bad}; choose among {', '.join(SIZES)}")
    rounds, steps = (1, 20) if args.quick else (args.rounds, args.steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with Interruptible() as run, tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        shakespeare = work / "tinyshakespeare.txt"
        if SHARED_CORPUS.is_file():
            shakespeare.write_bytes(SHARED_CORPUS.read_bytes())
        else:
            make_corpus(shakespeare, 1_115_394)
        started = starts(sizes, rounds, work, shakespeare)
        stepped = step_times(shakespeare, work / "cache-steps", steps, rounds, device)
        held = device_bytes(shakespeare, work / "cache-steps", device) if device.type == "cuda" \
            else None
    _report(args.out, started, stepped, held, rounds, steps, device, run.interrupted)
    run.exit_if_interrupted()


def _median(runs: list[tuple[float, int]]) -> tuple[float, int]:
    return statistics.median(w for w, _ in runs), statistics.median(r for _, r in runs)


def _report(out: str, started: dict, stepped: dict, held: dict | None, rounds: int, steps: int,
            device: torch.device, interrupted: bool) -> None:
    env = environment()
    base = _median(started["tiny Shakespeare"]["later run"])[0]
    rows, notes = [], []
    for name, got in started.items():
        row = [name]
        for measure in ("prepare", "first run", "later run"):
            if measure in got:
                wall, rss = _median(got[measure])
                row += [f"{wall:.2f}", f"{rss / 2**20:,.0f}"]
            else:
                row += ["-", "-"]
        later = _median(got["later run"])[0]
        row.append(f"{later - base:+.2f}" if name != "tiny Shakespeare" else "0")
        rows.append(row)
        if name in GOALS:
            met = later - base <= GOALS[name] and _median(got["later run"])[1] < PREPARE_GOAL[1]
            notes.append(f"{name}: a later run {later - base:+.2f} s over tiny Shakespeare's, "
                         f"goal at most +{GOALS[name]:.0f} s (and peak RSS under 1 GiB): "
                         f"{'met' if met else 'MISSED'}")
        if name == "1G":
            wall, rss = _median(got["prepare"])
            met = wall <= PREPARE_GOAL[0] and rss < PREPARE_GOAL[1]
            notes.append(f"1G: prepared in {wall:.1f} s, peak RSS {rss / 2**20:,.0f} MiB; goal at "
                         f"most {PREPARE_GOAL[0]:.0f} s and 1 GiB: {'met' if met else 'MISSED'}")
    now, before = (statistics.median(t["step"]) for t in stepped.values())
    notes.append(f"tiny Shakespeare: {now:.2f} ms/step from the prepared copy, {before:.2f} "
                 f"from the int64 tensor: {now / before:.3f}x, goal at most {STEP_GOAL}x: "
                 f"{'met' if now / before <= STEP_GOAL else 'MISSED'}")
    batch_now, batch_before = (statistics.median(t["batch"]) for t in stepped.values())
    notes.append(f"the data path's own cost: {batch_now:.1f} µs a batch against "
                 f"{batch_before:.1f}, {(batch_now - batch_before) / (before * 10):+.3f}% of a "
                 "step")
    notes.append(f"Starts: median of {rounds} rounds, wall time from launch to exit and peak "
                 "RSS of a fresh process; the later run's time over tiny Shakespeare's later run "
                 "in the same rounds. Steps: median over blocks of 10 steps alternating between "
                 f"the paths, {steps} steps a path in each of {rounds} rounds; µs/batch: median of "
                 f"the rounds' {steps * 10} batches drawn alone.")
    tokens = 12 * 64  # cpu-baby: batch 12, block 64
    step_rows = [[name, f"{statistics.median(t['step']):.2f}",
                  f"{tokens / statistics.median(t['step']) * 1e3:,.0f}",
                  f"{statistics.median(t['batch']):.1f}",
                  "-" if held is None else f"{held[name] / 2**20:,.2f}"]
                 for name, t in stepped.items()]
    if held is None:
        notes.append("device memory held by the data: CUDA only, not measured here")
    write_report(
        out, "data",
        "Data path: preparing a corpus once, later runs' starts, and the training step",
        ["corpus", "prepare s", "prepare peak RSS MiB", "first run s", "first run peak RSS MiB",
         "later run s", "later run peak RSS MiB", "later run s over tiny Shakespeare"],
        rows, env, notes="\n".join(f"- {n}" for n in notes) + "\n\n" + _step_table(step_rows),
        providers={NOW: None, BEFORE: None},
        interrupted=interrupted, data={"starts": started, "steps": stepped, "held": held,
                                       "device": str(device), "step_rows": step_rows})


def _step_table(rows: list[list[str]]) -> str:
    return ("cpu-baby training steps on tiny Shakespeare:\n\n" + markdown_table(
        ["batches from", "ms/step", "tok/s", "µs/batch alone", "device MiB held by data"], rows))


if __name__ == "__main__":
    main()
