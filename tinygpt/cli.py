"""Command line: `tinygpt train` and `tinygpt sample` (also `python -m tinygpt`)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from . import __version__, loggers
from .bench import DEFAULT_OUT, SUITES
from .config import (
    PRESETS,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    check_values,
    fields_of,
    from_preset,
    params_words,
    refuse_unused,
    split_ends,
)
from .errors import Stopped, UserError, first_line
from .launch import JOIN_TIMEOUT_S, Context, from_environment
from .threads import (
    ThreadTuner,
    count_kept,
    describe,
    fixed_by,
    plural,
    reproducible_blas,
    usable_cores,
)

RANK_GRACE_S = 5.0  # how long a torchrun rank other than 0 waits before reporting its error
MAX_JOIN_TIMEOUT_S = 86400.0


def _add_config_flags(group, cls, shown: dict[str, str] | None = None) -> None:
    """One flag per field of `cls` (`n_layer` -> `--n-layer`). Without `shown`, a flag left out
    takes the field's default; with it, it is None (the preset's value stands) and its help shows
    `shown[name]` as the default."""
    for f in fields_of(cls):
        if not f.metadata.get("cli", True):
            continue
        default = shown[f.name] if shown else "off" if f.default is None else f.default
        kwargs = {"dest": f.name, "default": None if shown else f.default,
                  "help": f"{f.metadata['help']} (default: {default})".replace("%", "%%")}
        kind = f.type.removesuffix(" | None")
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[kind]
            kwargs["metavar"] = f.name.upper()
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _preset_table() -> str:
    lines = ["presets (the values they set; `--preset NAME --help` shows every default of one):"]
    for name, values in PRESETS.items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults of the options"
        lines.append(f"  {name:17s} {shown}")
    return "\n".join(lines)


def _preset_defaults(chosen: str | None) -> dict[str, str]:
    """Each config field's default as `train --help` shows it: the chosen preset's value, or
    every preset's where they differ."""
    names = [chosen] if chosen in PRESETS else list(PRESETS)
    gpt_only = {f.name for f in fields_of(ModelConfig) if f.metadata.get("gpt_only")}
    muon_only = {f.name for f in fields_of(TrainConfig) if f.metadata.get("muon_only")}
    configs = {}
    for name in names:
        model, train = from_preset(name)
        configs[name] = {**vars(model), **vars(train)}
        if model.model == "bigram":
            configs[name].update(dict.fromkeys(gpt_only, "not used"))
        if train.optimizer != "muon":
            configs[name].update(dict.fromkeys(muon_only, "not used"))
    shown = {}
    for field, value in configs[names[0]].items():
        values = {name: config[field] for name, config in configs.items()}
        shown[field] = (str(value) if len(set(map(str, values.values()))) == 1 else
                        ", ".join(f"{name}: {v}" for name, v in values.items()))
    return shown


def _preset_in(argv: list[str]) -> str | None:
    """The value of --preset in `argv`, read before parsing so that help can show its defaults."""
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return None


class _Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported in one line like every other error."""

    def parse_args(self, args=None, namespace=None):
        """Arguments no command takes are pointed to that command's help; those after `torchrun`
        go to it as they are (`rest`)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if getattr(namespace, "command", None) == "torchrun":
            namespace.rest = extras
        elif extras:
            command = getattr(namespace, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            _error_line(f"unrecognized arguments: {' '.join(extras)} (see `{prog} --help`)")
            self.exit(2)
        return namespace

    def error(self, message: str):
        _error_line(f"{message} (see `{self.prog} --help`)")
        self.exit(2)


def _threads(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of threads (1 or more), "
                                         f"got {value!r}")
    cores = usable_cores()
    if int(value) > cores:
        shown = value if len(value) < 10 else f"{int(value):.3g}"
        raise argparse.ArgumentTypeError(f"must be at most {cores} (the logical CPUs this "
                                         f"process may run on), got {shown}")
    return int(value)


def _join_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_JOIN_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be a number of seconds in (0, "
                                         f"{MAX_JOIN_TIMEOUT_S:g}], got {value!r:.40}")
    return seconds


def _suite(value: str) -> str:
    if value not in SUITES:
        raise argparse.ArgumentTypeError(f"unknown suite {value!r}; choose from "
                                         f"{', '.join(SUITES)}")
    return value


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The command line; `train --help` shows the defaults of `preset`, or of every preset."""
    parser = _Parser(
        prog="tinygpt", description="Train and sample a character-level GPT.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"tinygpt {__version__}")
    threads_help = ("CPU threads for torch (default: the fastest count, found by timing the "
                    "work as it runs, unless OMP_*/MKL_* variables set them)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train a model", epilog=_preset_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train on tiny Shakespeare (downloaded once and cached) or on --data FILE. "
                    "Checkpoints: OUT_DIR/best.pt (best val loss) and OUT_DIR/last.pt.")
    train.add_argument("--preset", metavar="NAME",
                       help=f"named configuration: {', '.join(PRESETS)} (default: "
                            "shakespeare-char on CUDA, cpu-baby elsewhere)")
    train.add_argument("--data", metavar="FILE", help="UTF-8 text file to train on (default: "
                                                      "tiny Shakespeare, or a resumed run's own)")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT_DIR/last.pt, on the data file it names (training "
                            "options may be changed)")
    train.add_argument("--new-data", action="store_true",
                       help="with --resume: go on with --data FILE, a text other than the "
                            "checkpoint's (same characters)")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in an OUT_DIR that holds another run's checkpoints")
    train.add_argument("--log-interval", type=int, default=10, metavar="N",
                       help="report the training loss every N steps (default: 10)")
    train.add_argument("--log", action="append", default=[], metavar="NAME",
                       choices=("tensorboard", "wandb"),
                       help="also send the run's record to tensorboard (OUT_DIR/tensorboard) or "
                            "wandb (WANDB_MODE=offline keeps it on disk); repeatable")
    train.add_argument("--threads", type=_threads, metavar="N", help=threads_help)
    train.add_argument("--join-timeout", type=_join_timeout, default=JOIN_TIMEOUT_S,
                       metavar="S", help="under torchrun: seconds to wait for every process of "
                                         f"the job to start (default: {JOIN_TIMEOUT_S:g})")
    defaults = _preset_defaults(preset)
    whose = f"preset {preset}'s" if preset in PRESETS else "each preset's"
    for cls, title in ((ModelConfig, "model"), (TrainConfig, "training")):
        group = train.add_argument_group(f"{title} options (defaults: {whose})")
        _add_config_flags(group, cls, defaults)

    # Everything after `torchrun` is its own (see _Parser.parse_args); --help shows torchrun's.
    sub.add_parser("torchrun", add_help=False,
                   help="train data parallel: torchrun's options, then train and its options "
                        "(tinygpt torchrun --nproc_per_node=4 train --grad-accum 4)")

    sample = sub.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--ckpt", metavar="PATH", help="checkpoint (default: OUT_DIR/best.pt)")
    sample.add_argument("--out-dir", default="out",
                        help="where `train` wrote its checkpoints (default: out)")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    _add_config_flags(sample.add_argument_group("sampling options"), SampleConfig)
    sample.add_argument("--device", default="auto",
                        help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu "
                             "(default: auto)")
    sample.add_argument("--backend", default="auto", choices=("auto", "triton", "torch",
                                                               "reference"),
                        help="attention/LayerNorm implementation (default: auto)")
    sample.add_argument("--threads", type=_threads, metavar="N", help=threads_help)

    evaluate = sub.add_parser(
        "eval", help="score a checkpoint on a whole split: loss and bits per character",
        description="Every token of the split scored once, in windows of block_size sliding by "
                    "half a block (at least half a block of context), deterministically.")
    evaluate.add_argument("--ckpt", metavar="PATH", help="checkpoint (default: OUT_DIR/best.pt)")
    evaluate.add_argument("--out-dir", default="out",
                          help="where `train` wrote its checkpoints (default: out)")
    evaluate.add_argument("--data", metavar="FILE",
                          help="the text to score (default: the one the checkpoint names)")
    evaluate.add_argument("--split", default="val", choices=("train", "val", "test"),
                          help="which part of the text (default: val; test needs a --split with "
                               "three parts at training)")
    evaluate.add_argument("--batch-size", type=int, default=16, metavar="N",
                          help="windows scored at once (default: 16)")
    evaluate.add_argument("--device", default="auto",
                          help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu "
                               "(default: auto)")

    plot = sub.add_parser(
        "plot", help="draw runs' train and val loss against step and wall-clock time",
        description="Reads each OUT_DIR/metrics.jsonl; a colour a run, labelled with its "
                    "directory's name and the settings that differ between the runs.")
    plot.add_argument("out_dirs", nargs="+", metavar="OUT_DIR",
                      help="a run's output directory (or its metrics.jsonl)")
    plot.add_argument("-o", "--output", default="loss.png", metavar="FILE",
                      help="the picture: .png, .svg or .pdf (default: loss.png)")

    doctor = sub.add_parser(
        "doctor", help="check the fused kernels on this machine and time them against torch",
        description="Report this machine (device, driver, torch, Triton), check every fused "
                    "kernel's output and gradients against the fp64 reference at the model's "
                    "training shape and two odd ones, and time a training step on the triton "
                    "and torch backends. Exits with 1 when a kernel fails its check. Off CUDA "
                    "the kernels run in Triton's interpreter at small shapes: a smoke test.")
    doctor.add_argument("--device", default="auto",
                        help="auto (cuda, then the CPU), cuda, cuda:N or cpu (default: auto)")
    doctor.add_argument("--preset", metavar="NAME",
                        help=f"the model and batch to check and time: {', '.join(PRESETS)} "
                             "(default: shakespeare-char on CUDA, cpu-baby elsewhere)")
    doctor.add_argument("--batch-size", type=int, metavar="N",
                        help="sequences per training step (default: the preset's)")
    doctor.add_argument("--compile", action="store_true",
                        help="also time both backends under torch.compile (CUDA)")
    doctor.add_argument("--json", metavar="FILE", help="also write the report to FILE as JSON")
    _add_config_flags(doctor.add_argument_group(f"model options (defaults: {whose})"),
                      ModelConfig, defaults)

    bench = sub.add_parser(
        "bench", help="run the benchmarks and write a dated report (needs a source checkout)",
        description="Run the kernel, training-step and generation benchmarks and gather their "
                    "tables and plots in OUT/report-DEVICE-DATE.md.")
    bench.add_argument("suites", nargs="*", type=_suite, metavar="SUITE",
                       help=f"{', '.join(SUITES)} (default: all)")
    bench.add_argument("--out", default=DEFAULT_OUT,
                       help=f"where the results and the report go (default: {DEFAULT_OUT})")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes and few steps: checks that everything runs, not a speed")
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmarks

    report, interrupted = run_benchmarks(args.suites or list(SUITES), args.out, args.quick)
    if interrupted:
        print(f"tinygpt: interrupted; {report} holds what was measured", file=sys.stderr)
        return 130
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    names = [f.name for f in fields_of(ModelConfig)] + ["batch_size"]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    for cls in (ModelConfig, TrainConfig):
        check_values(cls, overrides)
    if args.preset is not None:
        from_preset(args.preset, **overrides)

    import torch

    # Off CUDA the kernels run in Triton's interpreter, which Triton reads when the kernels are
    # defined: before tinygpt.kernels is first imported.
    if not (args.device.startswith("cuda") or (args.device == "auto"
                                               and torch.cuda.is_available())):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .devices import pick_device
    from .doctor import run_doctor
    from .ops import interpreter_on

    device = pick_device(args.device)
    if device.type == "mps":
        raise UserError("the Triton kernels do not run on mps; `tinygpt doctor --device cpu` "
                        "checks them in Triton's interpreter")
    preset = args.preset or ("shakespeare-char" if device.type == "cuda" else "cpu-baby")
    model_cfg, cfg = from_preset(preset, **overrides)
    return run_doctor(device, model_cfg, cfg, args.compile,
                      device.type == "cpu" and interpreter_on(), args.json)


def _train_options(args: argparse.Namespace) -> dict:
    """The config fields `train` was given, checked as far as they can be before torch is
    imported and the preset is known."""
    names = [f.name for cls in (ModelConfig, TrainConfig) for f in fields_of(cls)]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if args.log_interval < 1:
        raise UserError(f"--log-interval must be at least 1, got {args.log_interval}")
    if args.resume and args.preset is not None:
        raise UserError("--resume and --preset cannot be used together: a resumed run keeps the "
                        "configuration in its checkpoint")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite cannot be used together: --overwrite starts a "
                        "new run, --resume continues the old one")
    loggers.check(args.log)
    if args.new_data and not (args.resume and args.data):
        raise UserError("--new-data cannot be used here: it goes with --resume --data FILE")
    for cls in (ModelConfig, TrainConfig):  # answered before torch is imported
        check_values(cls, overrides)
    if "split" in overrides:
        split_ends(overrides["split"], None)
    refuse_unused(overrides.get("model"), overrides.get("optimizer"), overrides)
    if args.preset is not None:
        from_preset(args.preset, **overrides)
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    overrides = _train_options(args)
    from .devices import pick_device
    from .train import train

    tune_threads = _set_threads(args.threads)
    preset = args.preset
    if preset is None and not args.resume:
        cuda = pick_device(overrides.get("device", "auto")).type == "cuda"
        preset = "shakespeare-char" if cuda else "cpu-baby"
    summary = train(preset or "shakespeare-char", overrides, data=args.data, resume=args.resume,
                    log_interval=args.log_interval, overwrite=args.overwrite,
                    new_data=args.new_data, tune_threads=tune_threads,
                    join_timeout=args.join_timeout, log=list(dict.fromkeys(args.log)))
    signum = summary["interrupted_by"]
    return 128 + signum if signum else 0


def _torchrun_parser():
    """torchrun's own parser, answering in one line like every other mistake."""
    import torch.distributed.run as torchrun

    parser = torchrun.get_args_parser()
    parser.prog = "tinygpt torchrun"
    parser.error = _Parser.error.__get__(parser)
    return parser


def _job_start(rest: list[str]) -> int:
    """Where `train` begins in `tinygpt torchrun`'s arguments (len(rest) where it is absent): the
    first `train` that is not an option's value. Only an option right before it, its value not
    joined by "=", leaves that in doubt (`--log-dir train`, or a flag): torchrun's own parser
    then decides, which costs importing torch."""
    for i, word in enumerate(rest):
        if word == "train":
            before = rest[i - 1] if i else ""
            if not (before.startswith("-") and "=" not in before):
                return i
            options = _torchrun_parser().parse_args(rest)
            if options.training_script != "train":
                break
            return len(rest) - len(options.training_script_args) - 1
    return len(rest)


def cmd_torchrun(args: argparse.Namespace) -> int:
    """torchrun with `train` as its program: the training options are checked once, before any
    process starts, and a failed job ends in one line instead of torchrun's traceback."""
    split = _job_start(args.rest)
    launcher, job = args.rest[:split], args.rest[split:]
    if job:
        _train_options(build_parser(_preset_in(job)).parse_args(job))
    elif not {"-h", "--help"} & set(launcher):
        raise UserError("tinygpt torchrun runs `train`: tinygpt torchrun [TORCHRUN OPTIONS] train "
                        "[TRAIN OPTIONS]")

    import logging

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = _torchrun_parser()
    if not job:  # torchrun's options: --help
        parser.print_help()
        return 0
    options = parser.parse_args([*launcher, "-m", "tinygpt", *job])
    if options.training_script != "tinygpt":  # a program named among torchrun's options
        raise UserError(f"tinygpt torchrun runs `train`, not {options.training_script!r:.60}: "
                        "tinygpt torchrun [TORCHRUN OPTIONS] train [TRAIN OPTIONS]")
    # torchrun's banner about OMP_NUM_THREADS, and its log line per failed process: the line
    # below says what failed
    logging.getLogger("torch.distributed.run").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun.run(options)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == 2:  # tinygpt's own error: the process said why in one line
            return 2
        if failure.exitcode < 0:
            name = signal.Signals(-failure.exitcode).name
            raise UserError(f"process {rank} of the job was killed by {name}") from None
        raise UserError(f"process {rank} of the job exited with code {failure.exitcode}; its "
                        "output is above") from None
    except SignalException as e:  # torchrun passed it on to the processes, which saved
        return 128 + e.sigval
    except Exception as e:  # torchrun's own failure: a rendezvous that timed out, say
        raise UserError(f"torchrun could not run the job ({first_line(e)})") from e
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    from .devices import pick_device
    from .evaluate import score_checkpoint

    path = Path(args.ckpt) if args.ckpt else Path(args.out_dir) / "best.pt"
    scored = score_checkpoint(path, args.split, pick_device(args.device), args.data,
                              args.batch_size, _note)
    print(scored.line)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import main as plot

    path = plot(args.out_dirs, args.output, _note)
    print(f"wrote {path}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    cfg = SampleConfig(**{f.name: getattr(args, f.name) for f in fields_of(SampleConfig)})
    cfg.validate()  # answered before torch is imported
    if not args.prompt:
        raise UserError("--prompt must contain at least one character")

    import torch

    from . import memory, ops, trust
    from .checkpoint import load_checkpoint
    from .data import tokenizer_for
    from .devices import pick_device
    from .generate import generate
    from .model import attention_shape, build_model

    tune_threads = _set_threads(args.threads)
    path = Path(args.ckpt) if args.ckpt else Path(args.out_dir) / "best.pt"
    ckpt = load_checkpoint(path)
    device = pick_device(args.device)
    tokenizer = tokenizer_for(TrainConfig(**ckpt["train_config"]).tokenizer, ckpt["vocab"])
    model_cfg = ModelConfig(**ckpt["model_config"])
    prompt = tokenizer.encode(args.prompt)
    resolved = ops.resolve_backend(args.backend, device, attention_shape(model_cfg, 1))
    choice = trust.settle(resolved, device, model_cfg, TrainConfig(batch_size=1),
                          ops.precision(device)[0],
                          explicit=ops.requested_backend(args.backend)[0] == "triton",
                          by_speed=False, say=_note)
    # Each token is a unit of work for the thread count: the tuner times the gaps between them.
    tuner = (ThreadTuner("sampling", "token", torch.get_num_threads(), say=_note)
             if tune_threads and device.type == "cpu" else None)
    amp_words = ops.precision(device)[1]
    if device.type == "cpu":
        amp_words += ", " + describe(tuner)
    loss = ckpt.get("best_val_loss")
    _note(f"sampling {path} (iteration {ckpt['iteration']}"
          + (f", val loss {loss:.4f}" if isinstance(loss, float) and loss < math.inf else "")
          + f") | {model_cfg.model} {params_words(model_cfg.num_params())} | device {device} "
          f"({amp_words}) | backend {choice.backend}"
          + (f" | cache {cfg.cache}" if model_cfg.model == "gpt" else ""))

    def stream(token: torch.Tensor) -> None:
        sys.stdout.write(decode(token[0].tolist()))
        sys.stdout.flush()
        if tuner is not None:
            tuner.tick()

    started = time.perf_counter()
    with memory.reported(device, "sampling", memory.sampling_advice(model_cfg, cfg.cache),
                         "nothing was written"), count_kept():
        model = build_model(model_cfg, choice.backend)
        model.load_state_dict(ckpt["model"])  # checked against its config on loading
        model.to(device).eval()
        idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        for i in range(cfg.num_samples):
            if i:
                print("-" * 40)
            sys.stdout.write(args.prompt)
            decode = tokenizer.streaming()
            generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                     generator, cache=cfg.cache, on_token=stream)
            sys.stdout.write(decode([], final=True))  # a character the last bytes left cut
            if tuner is not None:
                tuner.end()
            print(flush=True)
    seconds = time.perf_counter() - started
    tokens = cfg.num_samples * cfg.max_new_tokens
    threads = tuner.current if tuner else torch.get_num_threads()
    named = "characters" if tokenizer.unit == "char" else f"{tokenizer.unit}s"
    _note(f"sampled {tokens:,} {named} in {seconds:.1f} s "
          f"({tokens / seconds:,.0f} {tokenizer.unit}s/s"
          + (f", {plural(threads)})" if device.type == "cpu" else ")"))
    return 0


def _note(text: str) -> None:
    print(f"tinygpt: {text}", file=sys.stderr, flush=True)


def _set_threads(threads: int | None) -> bool:
    """Give torch `threads` CPU threads; without them, whether the count is left to timing:
    not when an environment variable fixes it."""
    if threads is None:
        return fixed_by() is None
    import torch

    torch.set_num_threads(threads)
    return False


def _report(error: UserError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    _error_line(str(error))


def _error_line(text: str) -> None:
    """One line on stderr. Every torchrun process meets the same mistakes, and torchrun stops the
    others as soon as one exits: rank 0 speaks at once, and another rank only after
    `RANK_GRACE_S`, if it is still running then (its error was its own, not rank 0's too)."""
    try:
        ctx = from_environment()
    except UserError:  # RANK and WORLD_SIZE describe no job: this process speaks for itself
        ctx = Context()
    if not ctx.is_main:
        time.sleep(RANK_GRACE_S)
    tag = "" if ctx.is_main else f" (rank {ctx.rank})"
    print(f"tinygpt: error{tag}: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    reproducible_blas()  # before torch first multiplies matrices
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_preset_in(argv)).parse_args(argv)
    try:
        commands = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval,
                    "plot": cmd_plot, "doctor": cmd_doctor,
                    "bench": cmd_bench, "torchrun": cmd_torchrun}
        return commands[args.command](args)
    except UserError as e:
        _report(e, args.debug)
        return 2
    except Stopped as e:  # before training began
        if from_environment().is_main:
            print(f"tinygpt: stopped by {signal.Signals(e.signum).name} before the first step; "
                  "nothing was written", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("tinygpt: interrupted", file=sys.stderr)
        return 130
