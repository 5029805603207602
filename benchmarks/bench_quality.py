"""Training quality: one run's loss curve and time to a target loss, or a sweep of optimizers and
learning rates over seeds.

    python -m benchmarks.bench_quality --preset cpu-baby --target 1.95
    python -m benchmarks.bench_quality --preset shakespeare-char --target 1.47   # CUDA
    python -m benchmarks.bench_quality --preset cpu-baby --sweep --adamw 1e-3 3e-3 5e-3 \\
        --muon 0.01 0.02 0.04 --seeds 1 2 3 --jobs 2

A single run writes OUT/<preset>-train[-<tag>]-<device>-<date>.md: every evaluation (step, wall
seconds, train and val loss), the best val loss, the best checkpoint scored on the whole val
split (`tinygpt eval`: loss and bits per character), and the wall time at which the val loss
first reached the target. Extra config overrides go in `--set FIELD VALUE`.

A sweep trains each configuration (AdamW at each `--adamw` rate; Muon at each `--muon` rate, with
each of `--ns-steps` Newton-Schulz iterations, and AdamW at `--lr` for the other parameters; each
of those at every combination of the `--vary FIELD VALUE...` values) once per seed, `--jobs` runs
at a time with the threads shared out among them. It first times the configurations' training
steps side by side (interleaved in one process, at the runs' thread count; on a CPU with AVX-512
or bf16 units, once more as an AVX2-only CPU, `report.AVX2_ONLY`) and writes
OUT/<preset>-sweep[-<tag>]-<device>-<date> .md, .json (with every run's evaluations) and .svg: val
loss at fixed steps, steps to the target (by default the mean final loss of AdamW at 1e-3,
nanoGPT's recipe) and their time at the measured ms/step, mean and spread over seeds, and the
mean loss curves. It checks its own results before writing them (`check_sweep`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import itertools
import math
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_train import DEVICE, optimizer_steps, optimizer_steps_as
from benchmarks.report import (
    AVX2_ONLY,
    AVX2_ONLY_WORDS,
    DEVICE_TAG,
    SHARED_CORPUS,
    add_out_argument,
    environment,
    simulates_another_cpu,
    write_report,
)
from tinygpt.config import from_preset
from tinygpt.devices import pick_device
from tinygpt.evaluate import score_checkpoint
from tinygpt.plot import curves
from tinygpt.train import train

PARITY_LR = 1e-3  # nanoGPT's AdamW rate: the sweep's default target is this config's final loss


# Fields that change what a step computes, not how long it takes.
TIMELESS = {"lr", "muon_lr", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "beta1",
            "beta2", "grad_clip", "seed"}


@dataclasses.dataclass(frozen=True)
class Config:
    optimizer: str
    lr: float  # AdamW's, for every parameter or (muon) for those Muon does not take
    muon_lr: float | None = None
    ns_steps: int | None = None  # Muon's Newton-Schulz iterations (None: the preset's)
    varied: tuple[tuple[str, object], ...] = ()  # (field, value) pairs from --vary

    @property
    def label(self) -> str:
        if self.optimizer == "muon":
            name = f"muon {self.muon_lr:g}{self._iterations} (+ adamw {self.lr:g})"
        else:
            name = f"adamw {self.lr:g}"
        return name + "".join(f", {k} {v:g}" if isinstance(v, float) else f", {k} {v}"
                              for k, v in self.varied)

    @property
    def _iterations(self) -> str:
        return f", {self.ns_steps} iterations" if self.ns_steps is not None else ""

    @property
    def step_label(self) -> str:
        """What its step time depends on: the optimizer (with Muon's iterations) and the varied
        fields that change a step's cost."""
        return (self.optimizer + (self._iterations if self.optimizer == "muon" else "")
                + "".join(f", {k} {v}" for k, v in self.varied if k not in TIMELESS))

    def overrides(self) -> dict:
        extra = {"muon_lr": self.muon_lr} if self.optimizer == "muon" else {}
        if self.optimizer == "muon" and self.ns_steps is not None:
            extra["muon_ns_steps"] = self.ns_steps
        return {"optimizer": self.optimizer, "lr": self.lr, **extra, **dict(self.varied)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-baby")
    parser.add_argument("--target", type=float, default=None,
                        help="val loss to reach (single run default 1.95; sweep default: the "
                             f"mean final loss of adamw at {PARITY_LR:g})")
    parser.add_argument("--data", default=str(SHARED_CORPUS) if SHARED_CORPUS.is_file() else None,
                        help="corpus (default: ../shared copy of tiny Shakespeare, else download)")
    add_out_argument(parser)
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"),
                        help="config override, e.g. --set eval_iters 50 (repeatable)")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true", help="sweep optimizers over seeds")
    sweep.add_argument("--adamw", type=float, nargs="*", default=[], metavar="LR",
                       help="AdamW learning rates")
    sweep.add_argument("--muon", type=float, nargs="*", default=[], metavar="LR",
                       help="Muon learning rates")
    sweep.add_argument("--ns-steps", type=int, nargs="+", default=[None], metavar="K",
                       help="Muon's Newton-Schulz iterations: each --muon rate with each "
                            "(default: the preset's)")
    sweep.add_argument("--vary", nargs="+", action="append", default=[],
                       metavar=("FIELD", "VALUE"), help="every config at each value of a config "
                       "field (repeatable: every combination), e.g. --vary batch_size 12 24")
    sweep.add_argument("--lr", type=float, default=PARITY_LR,
                       help="AdamW's rate for what Muon does not take (default %(default)g)")
    sweep.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    sweep.add_argument("--steps", type=int, default=None,
                       help="max_iters (default: the preset's; warm-up and decay scale with it)")
    sweep.add_argument("--evals", type=int, default=40, help="evaluations per run")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at a time")
    sweep.add_argument("--timing", type=int, nargs=2, default=[12, 10],
                       metavar=("ROUNDS", "STEPS"), help="side-by-side step timing: rounds, and "
                       "steps a round (default: 12 10)")
    parser.add_argument("--tag", default=None,
                        help="added to the report's name: OUT/<preset>-train-<tag>-<device>-"
                             "<date>, or OUT/<preset>-sweep-<tag>-...")
    args = parser.parse_args()
    overrides = {k: type_of(k)(v) for k, v in args.set}
    if args.sweep:
        if any(len(v) < 2 for v in args.vary):
            parser.error("--vary needs a field and at least one value")
        configs = sweep_configs(args)
        if not configs:
            parser.error("--sweep needs learning rates: --adamw LR ... and/or --muon LR ...")
        run_sweep(args, configs, overrides)
    else:
        single_run(args, overrides)


def sweep_configs(args: argparse.Namespace) -> list[Config]:
    """AdamW at each --adamw rate, Muon at each --muon rate with each --ns-steps; each at every
    combination of the --vary values."""
    variations = list(itertools.product(*[[(field, type_of(field)(v)) for v in values]
                                          for field, *values in args.vary]))
    return ([Config("adamw", lr, varied=v) for lr in args.adamw for v in variations]
            + [Config("muon", args.lr, lr, k, v) for lr in args.muon for k in args.ns_steps
               for v in variations])


def single_run(args: argparse.Namespace, overrides: dict) -> None:
    target = 1.95 if args.target is None else args.target
    with tempfile.TemporaryDirectory() as out_dir:
        summary = train(args.preset, {**overrides, "out_dir": out_dir}, data=args.data,
                        log_interval=100)
        scored = score_checkpoint(Path(out_dir) / "best.pt", "val", pick_device("auto"))
    reached = next((h for h in summary["history"] if h["val"] <= target), None)
    rows = [[h["iter"], f"{h['seconds']:.1f}", f"{h['train']:.4f}", f"{h['val']:.4f}"]
            for h in summary["history"]]
    notes = (
        f"- steps: {summary['steps']}, wall time: {summary['seconds']:.1f} s "
        f"(evaluations included), {summary['tokens_per_second']:,.0f} tokens/s\n"
        f"- best val loss: {summary['best_val_loss']:.4f}\n"
        f"- best.pt on the whole val split (`tinygpt eval`): {scored.line}\n"
        f"- val loss <= {target}: "
        + (f"first at step {reached['iter']}, {reached['seconds']:.1f} s" if reached
           else "not reached")
        + (f"\n- overrides: {overrides}" if overrides else "")
    )
    print(notes)
    stopped = summary["interrupted_by"]  # train() answers Ctrl-C by stopping after a step
    name = f"{args.preset}-train" + (f"-{args.tag}" if args.tag else "")
    write_report(args.out, name, f"Training run: {args.preset} preset",
                 ["step", "wall s", "train loss", "val loss"], rows, environment(), notes,
                 interrupted=bool(stopped))
    if stopped:
        raise SystemExit(128 + stopped)


def _train_quietly(preset: str, data: str | None, overrides: dict, threads: int) -> dict:
    """One run in a worker process, its progress lines kept out of the sweep's output."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out_dir, \
            contextlib.redirect_stderr(io.StringIO()):
        summary = train(preset, {**overrides, "out_dir": out_dir}, data=data,
                        log_interval=10**9)
    return {"history": summary["history"], "seconds": summary["seconds"],
            "steps": summary["steps"]}


def steps_to(history: list[dict], target: float) -> int | None:
    """The first evaluated step whose val loss is at most `target`; None if none is."""
    return next((h["iter"] for h in history if h["val"] <= target), None)


def check_sweep(results: dict[str, list[dict]], seeds: list[int], max_iters: int) -> None:
    """SystemExit unless every config has a run per seed, each ran all `max_iters` steps with
    finite losses, and all were evaluated at the same steps, ending at the last one."""
    problems = []
    steps = None
    for label, runs in results.items():
        if len(runs) != len(seeds):
            problems.append(f"{label}: {len(runs)} runs for {len(seeds)} seeds")
        for run in runs:
            evaluated = [h["iter"] for h in run["history"]]
            steps = steps or evaluated
            if run["steps"] != max_iters or evaluated != steps or evaluated[-1] != max_iters:
                problems.append(f"{label} seed {run['seed']}: ran {run['steps']} steps, "
                                f"evaluated at {evaluated[:3]}...{evaluated[-1:]}")
            if not all(math.isfinite(h[s]) for h in run["history"] for s in ("train", "val")):
                problems.append(f"{label} seed {run['seed']}: a loss is not finite")
    if problems:
        raise SystemExit("the sweep's results do not hold together: " + "; ".join(problems))


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def sweep_table(results: dict[str, list[dict]], target: float,
                ms: dict[str, dict[str, float]], at: list[int]
                ) -> tuple[list[str], list[list[str]]]:
    """One row a config: val loss at the steps `at`, steps to `target`, and for each machine
    (`ms`: machine name -> config -> ms/step; "" for this one) the time that takes."""
    headers = (["config", "seeds"] + [f"val @ {s}" for s in at]
               + [f"steps to {target:.4f} (each seed)"])
    for machine in ms:
        where = f" ({machine})" if machine else ""
        headers += [f"ms/step{where}", f"tok/s{where}", f"s to target{where}"]
    rows = []
    for label, runs in results.items():
        reached = [steps_to(r["history"], target) for r in runs]
        vals = [[next(h["val"] for h in r["history"] if h["iter"] == s) for r in runs]
                for s in at]
        mean_steps = statistics.mean(reached) if None not in reached else None
        row = ([label, str(len(runs))] + [_mean_sd(v) for v in vals]
               + [(f"{mean_steps:.0f}" if mean_steps is not None else "not all reached")
                  + f" ({', '.join('-' if s is None else str(s) for s in reached)})"])
        for times in ms.values():
            speed = runs[0]["tokens_per_step"] / times[label] * 1000
            row += [f"{times[label]:.2f}", f"{speed:,.0f}",
                    f"{mean_steps * times[label] / 1000:.1f}" if mean_steps is not None else "-"]
        rows.append(row)
    return headers, rows


def run_sweep(args: argparse.Namespace, configs: list[Config], overrides: dict) -> None:
    base = dict(overrides)
    if args.steps is not None:
        base["max_iters"] = args.steps
    model_cfg, cfg = from_preset(args.preset, **base)
    base.setdefault("eval_interval", max(1, cfg.max_iters // args.evals))
    threads = max(1, torch.get_num_threads() // args.jobs)
    print(f"timing a step of each optimizer side by side ({threads} threads)", flush=True)
    torch.set_num_threads(threads)
    # the step time does not depend on the learning rates
    rows = {c.step_label: ({**base, **c.overrides()}, None) for c in configs}
    machines = {"": optimizer_steps(args.preset, rows, *args.timing)}
    if DEVICE.type == "cpu" and simulates_another_cpu():
        print(f"and as a CPU with AVX2 only ({AVX2_ONLY_WORDS})", flush=True)
        machines["AVX2 only"] = optimizer_steps_as(AVX2_ONLY, args.preset, rows, *args.timing)
    ms = {machine: {c.label: statistics.median(timed[c.step_label][0]) for c in configs}
          for machine, timed in machines.items()}
    tokens = {}  # config label -> tokens a step
    for c in configs:
        c_model, c_train = from_preset(args.preset, **{**base, **c.overrides()})
        tokens[c.label] = c_train.batch_size * c_train.grad_accum * c_model.block_size
    results: dict[str, list[dict]] = {c.label: [] for c in configs}
    jobs = [(c, seed) for seed in args.seeds for c in configs]
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # a fresh torch in each worker
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {pool.submit(_train_quietly, args.preset, args.data,
                               {**base, **c.overrides(), "seed": seed}, threads): (c, seed)
                   for c, seed in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            config, seed = futures[future]
            run = {**future.result(), "seed": seed, "tokens_per_step": tokens[config.label]}
            results[config.label].append(run)
            print(f"[{done}/{len(jobs)}] {config.label} seed {seed}: val "
                  f"{run['history'][-1]['val']:.4f} at step {run['steps']} ({run['seconds']:.0f} s;"
                  f" {time.perf_counter() - started:.0f} s so far)", flush=True)
    for runs in results.values():
        runs.sort(key=lambda r: r["seed"])
    check_sweep(results, args.seeds, cfg.max_iters)
    parity = Config("adamw", PARITY_LR).label
    target = args.target
    if target is None:
        if parity not in results:
            raise SystemExit(f"no --target and no adamw {PARITY_LR:g} run to take it from")
        target = statistics.mean(r["history"][-1]["val"] for r in results[parity])
    interval = base["eval_interval"]
    at = sorted({round(cfg.max_iters * f / interval) * interval for f in (0.25, 0.5)}
                | {cfg.max_iters})
    headers, rows = sweep_table(results, target, ms, at)
    best = min(results, key=lambda k: statistics.mean(r["history"][-1]["val"]
                                                      for r in results[k]))
    preset_cfg = from_preset(args.preset)[1]
    default = (Config("muon", preset_cfg.lr, preset_cfg.muon_lr,
                      preset_cfg.muon_ns_steps if args.ns_steps != [None] else None)
               if preset_cfg.optimizer == "muon" else Config("adamw", preset_cfg.lr)).label
    name = f"{args.preset}-sweep" + (f"-{args.tag}" if args.tag else "")
    env = environment()
    notes = "\n".join([
        f"- {len(jobs)} runs of {cfg.max_iters} steps "
        f"({' or '.join(f'{t:,}' for t in dict.fromkeys(tokens.values()))} tokens a step), "
        f"evaluated every {interval} steps over {cfg.eval_iters} batches a split; {args.jobs} "
        f"at a time, {threads} threads each, {time.perf_counter() - started:.0f} s in all",
        f"- target: {target:.4f}" + (f", the mean final val loss of {parity}"
                                     if args.target is None else ""),
        f"- ms/step: median of {args.timing[0]} rounds of {args.timing[1]} steps, the optimizers "
        "interleaved in one process "
        f"(`bench_train.optimizer_steps`), {threads} threads; s to target = mean steps to target "
        "x ms/step (evaluations left out)"
        + (f"; (AVX2 only): the same timing in a fresh process with {AVX2_ONLY_WORDS}"
           if len(machines) > 1 else "; this CPU has neither AVX-512 nor bf16 units: it is "
           "itself the AVX2-only kind"),
        f"- best final val loss: {best}; the preset's default when this ran: {default}"
        + ("" if best == default else " (**not the best measured here**)"),
        f"- config overrides: {overrides}" if overrides else "",
        f"- loss curves: {name}-{DEVICE_TAG}-{env['date'][:10]}.svg (mean over seeds)",
    ])
    path = write_report(args.out, name,
                        f"Optimizer sweep: {args.preset} preset", headers, rows, env, notes,
                        data={"ms_per_step": ms, "runs": results})
    means = {label: {"val": [(h["iter"], math.nan,
                              statistics.mean(r["history"][i]["val"] for r in runs))
                             for i, h in enumerate(runs[0]["history"])]}
             for label, runs in results.items()}
    finals = [c["val"][-1][2] for c in means.values()]
    curves(path.with_suffix(".svg"), means,
           f"{args.preset}: val loss, mean of {len(args.seeds)} seeds", y_label="val loss",
           y_range=(min(finals) - 0.05, max(finals) + 0.6))
    print(f"wrote {path.with_suffix('.svg')}")


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
