"""Command line: `tinygpt train` and `tinygpt sample` (also `python -m tinygpt`)."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from .config import (
    PRESETS,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    check_values,
    fields_of,
    from_preset,
)
from .errors import UserError
from .launch import Context, from_environment

RANK_GRACE_S = 5.0  # how long a torchrun rank other than 0 waits before reporting its error


def _add_config_flags(group, cls, defaults: bool) -> None:
    """One flag per field of `cls` (`n_layer` -> `--n-layer`). With `defaults`, a flag left out
    takes the field's default; without, it is None and the preset's value stands."""
    for f in fields_of(cls):
        if not f.metadata.get("cli", True):
            continue
        shown = defaults and f.default is not None
        kwargs = {"dest": f.name, "default": f.default if defaults else None,
                  "help": f.metadata["help"] + (" (default: %(default)s)" if shown else "")}
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
    lines = ["presets:"]
    for name, values in PRESETS.items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items()) or "the defaults below"
        lines.append(f"  {name:17s} {shown}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported in one line like every other error."""

    def error(self, message: str):
        self.exit(2, f"tinygpt: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tinygpt", description="Train and sample a character-level GPT.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train a model", epilog=_preset_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train on tiny Shakespeare (downloaded once and cached) or on --data FILE. "
                    "Checkpoints: OUT_DIR/best.pt (best val loss) and OUT_DIR/last.pt.")
    train.add_argument("--preset", help="named configuration (default: shakespeare-char on "
                                        "CUDA, cpu-baby elsewhere)")
    train.add_argument("--data", metavar="FILE", help="UTF-8 text file to train on")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT_DIR/last.pt (training options may be changed)")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in an OUT_DIR that holds another run's checkpoints")
    train.add_argument("--log-interval", type=int, default=10, metavar="N",
                       help="report the training loss every N steps (default: 10)")
    for cls, title in ((ModelConfig, "model"), (TrainConfig, "training")):
        group = train.add_argument_group(f"{title} options (default: the preset's value)")
        _add_config_flags(group, cls, defaults=False)

    sample = sub.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--ckpt", metavar="PATH", help="checkpoint (default: OUT_DIR/best.pt)")
    sample.add_argument("--out-dir", default="out", help="where `train` wrote its checkpoints")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    _add_config_flags(sample.add_argument_group("sampling options"), SampleConfig, defaults=True)
    sample.add_argument("--device", default="auto",
                        help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    sample.add_argument("--backend", default="auto", choices=("auto", "triton", "torch",
                                                               "reference"),
                        help="attention/LayerNorm implementation (default: auto)")

    bench = sub.add_parser(
        "bench", help="run the benchmarks and write a dated report (needs a source checkout)",
        description="Run the kernel, training-step and generation benchmarks and gather their "
                    "tables and plots in OUT/report-DEVICE-DATE.md.")
    bench.add_argument("suites", nargs="*", default=["kernels", "train", "generate"],
                       choices=["kernels", "train", "generate"], metavar="SUITE",
                       help="kernels, train and/or generate (default: all three)")
    bench.add_argument("--out", default="benchmarks/results", help="where results go")
    bench.add_argument("--quick", action="store_true",
                       help="small shapes and few steps: checks that everything runs, not a speed")
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmarks

    run_benchmarks(args.suites, args.out, args.quick)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    names = [f.name for cls in (ModelConfig, TrainConfig) for f in fields_of(cls)]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if args.log_interval < 1:
        raise UserError(f"--log-interval must be at least 1, got {args.log_interval}")
    for cls in (ModelConfig, TrainConfig):  # answered before torch is imported
        check_values(cls, overrides)
    if args.preset is not None:
        from_preset(args.preset, **overrides)

    from .train import pick_device, train

    preset = args.preset
    if preset is None and not args.resume:
        cuda = pick_device(overrides.get("device", "auto")).type == "cuda"
        preset = "shakespeare-char" if cuda else "cpu-baby"
    summary = train(preset or "shakespeare-char", overrides, data=args.data, resume=args.resume,
                    log_interval=args.log_interval, overwrite=args.overwrite)
    signum = summary["interrupted_by"]
    return 128 + signum if signum else 0


def cmd_sample(args: argparse.Namespace) -> int:
    cfg = SampleConfig(**{f.name: getattr(args, f.name) for f in fields_of(SampleConfig)})
    cfg.validate()  # answered before torch is imported
    if not args.prompt:
        raise UserError("--prompt must contain at least one character")

    import torch

    from . import ops
    from .checkpoint import load_checkpoint, restore
    from .data import Tokenizer
    from .generate import generate
    from .model import attention_shape, build_model
    from .train import pick_device

    path = Path(args.ckpt) if args.ckpt else Path(args.out_dir) / "best.pt"
    ckpt = load_checkpoint(path)
    device = pick_device(args.device)
    tokenizer = Tokenizer(ckpt["vocab"])
    prompt = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long, device=device)
    model_cfg = ModelConfig(**ckpt["model_config"])
    backend = ops.resolve_backend(args.backend, device, attention_shape(model_cfg, 1))
    model = build_model(model_cfg, backend)
    restore(model, ckpt["model"], path)
    model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def stream(token: torch.Tensor) -> None:
        sys.stdout.write(tokenizer.decode(token[0].tolist()))
        sys.stdout.flush()

    for i in range(cfg.num_samples):
        if i:
            print("-" * 40)
        sys.stdout.write(args.prompt)
        generate(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                 generator, cache=cfg.cache, on_token=stream)
        print(flush=True)
    return 0


def _report(error: UserError, debug: bool) -> None:
    """One line on stderr. Every torchrun process meets the same mistakes, and torchrun stops the
    others as soon as one exits: rank 0 speaks at once, and another rank only after
    `RANK_GRACE_S`, if it is still running then (its error was its own, not rank 0's too)."""
    try:
        ctx = from_environment()
    except UserError:  # RANK and WORLD_SIZE describe no job: this process speaks for itself
        ctx = Context()
    if not ctx.is_main:
        time.sleep(RANK_GRACE_S)
    if debug:
        traceback.print_exc()
    tag = "" if ctx.is_main else f" (rank {ctx.rank})"
    print(f"tinygpt: error{tag}: {error}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": cmd_train, "sample": cmd_sample, "bench": cmd_bench}
        return commands[args.command](args)
    except UserError as e:
        _report(e, args.debug)
        return 2
    except KeyboardInterrupt:
        print("tinygpt: interrupted", file=sys.stderr)
        return 130
