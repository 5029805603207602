"""`python -m benchmarks.bench_record`: what keeping a run's record (OUT_DIR/metrics.jsonl) costs
a cpu-baby training step, against the same run with recording off, side by side.

    python -m benchmarks.bench_record [--steps 200] [--rounds 5] [--out DIR]

Each round trains cpu-baby for `--steps` steps at `--log-interval` 1 and at the default 10, with
the record on and off, in an order that alternates between rounds; ms/step is the run's wall time
over its steps (its two one-batch evaluations included, the same in both). Beside it, the time
spent inside the recording itself (`Metrics.add`) per step of the runs with the record on: the
part of the difference that is not noise. (cpu-baby clips its gradients, so the norm a step record
holds is computed with or without it.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import (
    SHARED_CORPUS,
    Interruptible,
    add_out_argument,
    environment,
    write_report,
)
from tinygpt.metrics import Metrics
from tinygpt.train import train

GOAL = 0.01  # the record's share of a step at --log-interval 1, at most
INTERVALS = (1, 10)


class Stopwatch:
    """Seconds spent in `Metrics.add` while installed."""

    def __init__(self):
        self.seconds = 0.0
        self.real = Metrics.add

    def __enter__(self) -> Stopwatch:
        real, watch = self.real, self

        def add(metrics, record):
            start = time.perf_counter()
            real(metrics, record)
            watch.seconds += time.perf_counter() - start

        Metrics.add = add
        return self

    def __exit__(self, *exc) -> None:
        Metrics.add = self.real


def one_run(data: str | None, steps: int, interval: int, record: bool, out_dir: str) -> dict:
    overrides = {"max_iters": steps, "eval_interval": steps, "eval_iters": 1, "device": "cpu",
                 "backend": "torch", "out_dir": out_dir}
    with Stopwatch() as watch, contextlib.redirect_stderr(io.StringIO()):
        summary = train("cpu-baby", overrides, data=data, log_interval=interval, record=record,
                        overwrite=True)
    return {"ms": summary["seconds"] / steps * 1e3, "inside_ms": watch.seconds / steps * 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    data = str(SHARED_CORPUS) if SHARED_CORPUS.is_file() else None
    runs: dict[tuple[int, bool], list[dict]] = {(i, r): [] for i in INTERVALS
                                                for r in (True, False)}
    with Interruptible() as interrupted, tempfile.TemporaryDirectory() as tmp:
        one_run(data, 20, 1, True, tmp)  # warm: the first run pays for imports and allocations
        for n in range(args.rounds):
            for interval in INTERVALS:
                for record in (True, False) if n % 2 == 0 else (False, True):
                    got = one_run(data, args.steps, interval, record, str(Path(tmp) / "run"))
                    runs[interval, record].append(got)
                    print(f"round {n + 1}/{args.rounds} --log-interval {interval} record "
                          f"{'on' if record else 'off'}: {got['ms']:.2f} ms/step", flush=True)
    rows, notes = [], []
    tokens = 12 * 64  # cpu-baby: batch 12, block 64
    for interval in INTERVALS:
        on, off = (statistics.median(r["ms"] for r in runs[interval, flag])
                   for flag in (True, False))
        inside = statistics.median(r["inside_ms"] for r in runs[interval, True])
        for flag, ms in ((True, on), (False, off)):
            rows.append([str(interval), "on" if flag else "off", f"{ms:.2f}",
                         f"{tokens / ms * 1e3:,.0f}", f"{inside:.3f}" if flag else "-"])
        share = inside / off
        verdict = ("met" if share <= GOAL else "MISSED") if interval == 1 else "-"
        notes.append(f"--log-interval {interval}: {on / off:.3f}x the time with the record on; "
                     f"the recording itself {inside * 1e3:.0f} µs a step, {share:.3%} of a step"
                     + (f" (goal at most {GOAL:.0%}: {verdict})" if interval == 1 else ""))
    notes.append(f"Median of {args.rounds} rounds of {args.steps}-step runs; ms/step: a run's "
                 "wall time over its steps; 'inside': time in Metrics.add per step of the runs "
                 "with the record on.")
    write_report(args.out, "record", "Recording a run: cpu-baby's step with metrics.jsonl on "
                 "and off", ["--log-interval", "record", "ms/step", "tok/s",
                             "inside the record, ms/step"],
                 rows, environment(), notes="\n".join(f"- {n}" for n in notes),
                 providers={"record on": None, "record off": None},
                 interrupted=interrupted.interrupted, data={"runs": {
                     f"{i}-{'on' if r else 'off'}": v for (i, r), v in runs.items()}})
    interrupted.exit_if_interrupted()


if __name__ == "__main__":
    main()
