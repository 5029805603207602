"""Train a preset on tiny Shakespeare and record the loss curve and the time to a target loss.

    python -m benchmarks.bench_quality --preset cpu-baby --target 1.95
    python -m benchmarks.bench_quality --preset shakespeare-char --target 1.47   # CUDA

Writes OUT/<preset>-train-<device>-<date>.md with every evaluation (step, wall
seconds, train and val loss), the best val loss, and the wall time at which the val loss first
reached the target. Extra arguments after `--` go to `tinygpt train` as config overrides.
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks.report import SHARED_CORPUS, add_out_argument, environment, write_report
from tinygpt.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-baby")
    parser.add_argument("--target", type=float, default=1.95, help="val loss to reach")
    parser.add_argument("--data", default=str(SHARED_CORPUS) if SHARED_CORPUS.is_file() else None,
                        help="corpus (default: ../shared copy of tiny Shakespeare, else download)")
    add_out_argument(parser)
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"),
                        help="config override, e.g. --set eval_iters 50 (repeatable)")
    args = parser.parse_args()
    overrides = {k: type_of(k)(v) for k, v in args.set}
    with tempfile.TemporaryDirectory() as out_dir:
        summary = train(args.preset, {**overrides, "out_dir": out_dir}, data=args.data,
                        log_interval=100)
    reached = next((h for h in summary["history"] if h["val"] <= args.target), None)
    rows = [[h["iter"], f"{h['seconds']:.1f}", f"{h['train']:.4f}", f"{h['val']:.4f}"]
            for h in summary["history"]]
    notes = (
        f"- steps: {summary['steps']}, wall time: {summary['seconds']:.1f} s "
        f"(evaluations included), {summary['tokens_per_second']:,.0f} tokens/s\n"
        f"- best val loss: {summary['best_val_loss']:.4f}\n"
        f"- val loss <= {args.target}: "
        + (f"first at step {reached['iter']}, {reached['seconds']:.1f} s" if reached
           else "not reached")
        + (f"\n- overrides: {overrides}" if overrides else "")
    )
    print(notes)
    stopped = summary["interrupted_by"]  # train() answers Ctrl-C by stopping after a step
    write_report(args.out, f"{args.preset}-train", f"Training run: {args.preset} preset",
                 ["step", "wall s", "train loss", "val loss"], rows, environment(), notes,
                 interrupted=bool(stopped))
    if stopped:
        raise SystemExit(128 + stopped)


def type_of(field_name: str):
    from tinygpt.config import ModelConfig, TrainConfig, fields_of

    for cls in (ModelConfig, TrainConfig):
        for f in fields_of(cls):
            if f.name == field_name:
                return {"int": int, "float": float, "str": str,
                        "bool": lambda v: v.lower() in ("1", "true", "yes")}[f.type]
    raise SystemExit(f"unknown config field {field_name!r}")


if __name__ == "__main__":
    main()
