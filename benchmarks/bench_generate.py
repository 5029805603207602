"""Generation speed: characters per second with the key/value cache (shift and exact) and without.

    python -m benchmarks.bench_generate [--lengths 500 1000 2000] [--quick] [--out DIR]
    python -m pytest benchmarks/bench_generate.py --benchmark-enable

Models are freshly initialised at the cpu-baby and shakespeare-char sizes (speed does not depend
on the weights); one sample, prompt of one newline, temperature 1. Runs on CUDA when present,
otherwise on the CPU.
"""

from __future__ import annotations

import argparse
import time

import pytest
import torch

from benchmarks.report import (
    CUDA,
    Interruptible,
    Rows,
    add_out_argument,
    environment,
    write_report,
)
from tinygpt import ops
from tinygpt.config import from_preset
from tinygpt.generate import generate
from tinygpt.model import build_model

DEVICE = torch.device("cuda" if CUDA else "cpu")
MODES = ("shift", "exact", "off")


def make_model(preset: str):
    model_cfg, _ = from_preset(preset)
    torch.manual_seed(0)
    return build_model(model_cfg, ops.resolve_backend("auto", DEVICE)).to(DEVICE).eval()


def chars_per_second(model, n: int, cache: str) -> float:
    prompt = torch.zeros((1, 1), dtype=torch.long, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    generate(model, prompt, 8, generator=gen, cache=cache)  # warm-up
    if CUDA:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, prompt, n, generator=gen, cache=cache)
    if CUDA:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


@pytest.mark.parametrize("cache", MODES)
def test_generate_100_chars(benchmark, cache):
    model = make_model("cpu-baby")
    prompt = torch.zeros((1, 1), dtype=torch.long, device=DEVICE)
    benchmark.extra_info.update(preset="cpu-baby", device=str(DEVICE), new_chars=100)
    out = benchmark.pedantic(lambda: generate(model, prompt, 100, cache=cache), rounds=3,
                             iterations=1)
    assert out.shape == (1, 101) and 0 <= out.min() and out.max() < model.config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[500, 1000, 2000] if CUDA else [500, 1000],
                        help="new characters per row (default: 500 1000, and 2000 on CUDA; "
                             "uncached, the CPU writes some 20 characters/s at the larger size)")
    parser.add_argument("--presets", nargs="+", default=["cpu-baby", "shakespeare-char"])
    parser.add_argument("--quick", action="store_true",
                        help="100 characters from the cpu-baby model: checks that it runs")
    add_out_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.presets = [100], ["cpu-baby"]
    rows = Rows(["model", "new chars", "cache", "chars/s", "vs no cache"])
    with Interruptible() as run:
        for preset in args.presets:
            model = make_model(preset)
            for n in args.lengths:
                speed = {mode: chars_per_second(model, n, mode) for mode in MODES}
                for mode in MODES:
                    rows.append([preset, n, mode, f"{speed[mode]:,.1f}",
                                 f"{speed[mode] / speed['off']:.1f}x"])
    write_report(args.out, "generate", f"Generation speed ({DEVICE.type}), chars/s",
                 rows.headers, rows, environment(),
                 interrupted=run.interrupted)
    run.exit_if_interrupted()


if __name__ == "__main__":
    main()
