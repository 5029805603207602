"""Command line: `tinygpt train` and `tinygpt sample` (also `python -m tinygpt`)."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from .config import PRESETS, ModelConfig, TrainConfig, fields_of
from .errors import UserError


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (`n_layer` -> `--n-layer`); unset flags keep the preset's value."""
    for cls, title in ((ModelConfig, "model"), (TrainConfig, "training")):
        group = parser.add_argument_group(f"{title} options (default: the preset's value)")
        for f in fields_of(cls):
            if not f.metadata.get("cli", True):
                continue
            flag = "--" + f.name.replace("_", "-")
            kwargs = {"dest": f.name, "default": None, "help": f.metadata["help"]}
            if f.type in ("bool", bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = {"int": int, "float": float, "str": str}[f.type]
                kwargs["metavar"] = f.name.upper() if "choices" not in f.metadata else None
                if "choices" in f.metadata:
                    kwargs["choices"] = f.metadata["choices"]
            group.add_argument(flag, **kwargs)


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
    _add_config_flags(train)

    sample = sub.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--ckpt", metavar="PATH", help="checkpoint (default: OUT_DIR/best.pt)")
    sample.add_argument("--out-dir", default="out", help="where `train` wrote its checkpoints")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--max-new-tokens", type=int, default=500, metavar="N")
    sample.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature; 0 picks the most likely character")
    sample.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample only among the K most likely characters")
    sample.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample only among the most likely characters that make up P")
    sample.add_argument("--cache", default="shift", choices=("shift", "exact", "off"),
                        help="key/value cache: shift (default, constant cost per character), "
                             "exact (same tokens as off), off (re-run the context every step)")
    sample.add_argument("--seed", type=int, default=1337)
    sample.add_argument("--num-samples", type=int, default=1, metavar="N")
    sample.add_argument("--device", default="auto")
    sample.add_argument("--backend", default="auto",
                        choices=("auto", "triton", "torch", "reference"))

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
    from .train import pick_device, train

    names = [f.name for cls in (ModelConfig, TrainConfig) for f in fields_of(cls)]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if args.log_interval < 1:
        raise UserError("--log-interval must be at least 1")
    preset = args.preset
    if preset is None and not args.resume:
        cuda = pick_device(overrides.get("device", "auto")).type == "cuda"
        preset = "shakespeare-char" if cuda else "cpu-baby"
    summary = train(preset or "shakespeare-char", overrides, data=args.data, resume=args.resume,
                    log_interval=args.log_interval, overwrite=args.overwrite)
    signum = summary["interrupted_by"]
    return 128 + signum if signum else 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from . import ops
    from .checkpoint import load_checkpoint, restore
    from .data import Tokenizer
    from .generate import generate
    from .model import attention_shape, build_model
    from .train import pick_device

    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise UserError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        raise UserError("--prompt must contain at least one character")
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
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def stream(token: torch.Tensor) -> None:
        sys.stdout.write(tokenizer.decode(token[0].tolist()))
        sys.stdout.flush()

    for i in range(args.num_samples):
        if i:
            print("-" * 40)
        sys.stdout.write(args.prompt)
        generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                 generator, cache=args.cache, on_token=stream)
        print(flush=True)
    return 0


def _speaks() -> bool:
    """Under torchrun, rank 0 speaks for all; a process with a broken RANK speaks for itself."""
    from .distributed import from_environment

    try:
        return from_environment().is_main
    except UserError:
        return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": cmd_train, "sample": cmd_sample, "bench": cmd_bench}
        return commands[args.command](args)
    except UserError as e:
        if _speaks():
            if args.debug:
                traceback.print_exc()
            print(f"tinygpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinygpt: interrupted", file=sys.stderr)
        return 130
