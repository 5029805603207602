"""`python -m benchmarks.bench_train --load`: `tinygpt train --preset cpu-baby` and `tinygpt
sample` at each CPU thread setting, on an idle machine and with one core busy.

Each run is a fresh process, as a user starts it: OpenMP reads its wait policy once, when it
starts. "Busy" is a child process spinning on one core (`BusyCore`) for the length of the run.
The default row is tinygpt's own choice (threads timed as the run goes); the others fix the count
with --threads, or the wait policy with OpenMP's variables (with torch's count: every core).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.report import SHARED_CORPUS, Interruptible, environment, write_report
from tinygpt.threads import THREAD_VARIABLES, candidates, usable_cores

DEFAULT = "default (threads timed)"
STEP_LINE = re.compile(r"\] (\d+)/\d+ loss \S+ \| ([\d.]+) ms/iter")
VAL_LOSS = re.compile(r"final val loss ([\d.]+)")
CHARS_PER_S = re.compile(r"\(([\d,]+) chars/s")
RUN_TIMEOUT_S = 900


def settings(cores: int, quick: bool) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Row name -> (tinygpt options, environment variables): the default, each count the default
    times (torch's own among them), and OpenMP's wait policies."""
    rows = {DEFAULT: ([], {})}
    for n in candidates(cores, torch.get_num_threads()) if not quick else [1]:
        rows[f"--threads {n}"] = (["--threads", str(n)], {})
    if not quick:
        for name, value in (("GOMP_SPINCOUNT", "10000"), ("GOMP_SPINCOUNT", "1000"),
                            ("OMP_WAIT_POLICY", "PASSIVE")):
            rows[f"{name}={value}"] = ([], {name: value})
    return rows


class BusyCore:
    """`with BusyCore():` another process spins on one core, the last this one may use, until
    the block ends (and for at most `limit_s` even if this process dies)."""

    SPIN = ("import os, sys, time\n"
            "if hasattr(os, 'sched_setaffinity'):\n"
            "    os.sched_setaffinity(0, {int(sys.argv[1])})\n"
            "end = time.monotonic() + float(sys.argv[2])\n"
            "while time.monotonic() < end:\n"
            "    pass\n")

    def __init__(self, limit_s: float = RUN_TIMEOUT_S):
        self.limit_s = limit_s

    def __enter__(self) -> BusyCore:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        self.proc = subprocess.Popen([sys.executable, "-c", self.SPIN, str(cores[-1]),
                                      str(self.limit_s)])
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


def tinygpt(args: list[str], variables: dict[str, str], busy: bool) -> str:
    """Run `python -m tinygpt ARGS` with only `variables` among the thread settings of the
    environment; returns its stderr (progress and notes). A failed run is an error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(THREAD_VARIABLES)}
    env.update(variables)
    command = [sys.executable, "-m", "tinygpt", *args]
    with BusyCore() if busy else contextlib.nullcontext():
        proc = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stderr


def train_run(out_dir: Path, options: list[str], variables: dict[str, str], busy: bool,
              steps: int, first: int, data: str | None) -> dict:
    """ms per step from the progress lines of steps first..steps, and the final val loss."""
    args = ["train", "--preset", "cpu-baby", "--max-iters", str(steps), "--eval-interval",
            str(steps), "--log-interval", "1", "--out-dir", str(out_dir), "--overwrite",
            *(["--data", data] if data else []), *options]
    err = tinygpt(args, variables, busy)
    ms = [float(m[2]) for m in STEP_LINE.finditer(err) if int(m[1]) >= first]
    return {"median": statistics.median(ms), "mean": statistics.fmean(ms),
            "val": VAL_LOSS.search(err)[1]}


def sample_run(ckpt: Path, options: list[str], variables: dict[str, str], busy: bool,
               tokens: int) -> float:
    """Characters per second of `tinygpt sample`, as it reports them."""
    err = tinygpt(["sample", "--ckpt", str(ckpt), "--max-new-tokens", str(tokens), *options],
                  variables, busy)
    return float(CHARS_PER_S.search(err)[1].replace(",", ""))


def thread_settings_table(out: str, quick: bool = False, rounds: int = 3) -> None:
    """Every setting idle and busy, in `rounds` rounds; each figure is the median over the
    rounds, so that one disturbed run does not make a row."""
    steps, first, tokens = (40, 10, 300) if quick else (200, 20, 3000)
    rounds = 1 if quick else rounds
    data = str(SHARED_CORPUS) if SHARED_CORPUS.is_file() else None
    rows = settings(usable_cores(), quick)
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in rows}
    with Interruptible() as run, tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        names = list(rows)
        for r in range(rounds):  # each round starts one setting further on: no fixed order
            for i in range(len(names)):
                n = (i + r) % len(names)
                name, (options, variables) = names[n], rows[names[n]]
                for busy in (False, True):
                    where = "busy" if busy else "idle"
                    out_dir = Path(tmp) / f"run-{n}-{where}"
                    measured = train_run(out_dir, options, variables, busy, steps, first, data)
                    ckpt = ckpt or out_dir / "last.pt"
                    measured["chars/s"] = sample_run(ckpt, options, variables, busy, tokens)
                    runs[name].setdefault(where, []).append(measured)
                    print(f"round {r + 1}/{rounds}", name, where, measured, flush=True)
    results = {name: {where: {key: statistics.median(m[key] for m in measured)
                              for key in ("median", "mean", "chars/s")}
                      | {"val": " / ".join(sorted({m["val"] for m in measured}))}
                      for where, measured in got.items()}
               for name, got in runs.items() if got}
    tokens_per_step = 12 * 64  # cpu-baby: batch 12, block 64
    table = []
    for name, got in results.items():
        row = [name]
        for where in ("idle", "busy"):
            r = got.get(where)
            row += ([f"{r['median']:.1f}", f"{r['mean']:.1f}",
                     f"{tokens_per_step / r['mean'] * 1000:,.0f}", f"{r['chars/s']:,.0f}"]
                    if r else ["-"] * 4)
        row.append(" / ".join(sorted({r["val"] for r in got.values()})))
        table.append(row)
    write_report(
        out, "cpu_threads",
        f"CPU threads: cpu-baby training ({steps} steps) and sampling ({tokens} characters), "
        "idle and with one core busy",
        ["setting", "idle ms/step (median)", "idle ms/step (mean)", "idle tok/s",
         "idle chars/s", "busy ms/step (median)", "busy ms/step (mean)", "busy tok/s",
         "busy chars/s", f"val loss at step {steps}"],
        table, environment(), notes=_verdicts(results, steps, first, rounds),
        providers={name: None for name in results}, interrupted=run.interrupted)
    run.exit_if_interrupted()


def _verdicts(results: dict[str, dict], steps: int, first: int, rounds: int) -> str:
    """The default against the best fixed setting, per column, with issue 45's goals."""
    lines = [f"ms/step: over steps {first}-{steps} from `tinygpt train --log-interval 1`; the "
             "mean counts every re-check the default makes, and the goals are judged on it. "
             "chars/s: as `tinygpt sample` reports it, re-checks included. Busy: another "
             "process spins on one core for the whole run. Each figure: the median of "
             f"{rounds} round{'s' if rounds > 1 else ''}, every setting in each."]
    fixed = {n: r for n, r in results.items() if n != DEFAULT}
    ours = results.get(DEFAULT, {})
    for where, goal in (("idle", 1.05), ("busy", 1.15)):
        if where not in ours or not any(where in r for r in fixed.values()):
            continue
        best = min((n for n in fixed if where in fixed[n]), key=lambda n: fixed[n][where]["mean"])
        ratio = ours[where]["mean"] / fixed[best][where]["mean"]
        fastest = max((n for n in fixed if where in fixed[n]),
                      key=lambda n: fixed[n][where]["chars/s"])
        sample = fixed[fastest][where]["chars/s"] / ours[where]["chars/s"]
        lines.append(f"{where}: training {ratio:.2f}x the time of the best fixed setting "
                     f"({best}), sampling {sample:.2f}x ({fastest}); goal at most {goal}x: "
                     f"{'met' if max(ratio, sample) <= goal else 'MISSED'}")
    losses = {v for got in results.values() for r in got.values() for v in r["val"].split(" / ")}
    lines.append(f"val loss: {'the same' if len(losses) == 1 else 'DIFFERENT'} in every run "
                 "(the thread count never changes a result)")
    return "\n".join(f"- {line}" for line in lines)
