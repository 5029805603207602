"""Training-step benchmark: forward + backward + AdamW step on one batch.

    pytest benchmarks/bench_train.py --benchmark-enable      # pytest-benchmark entries
    python -m benchmarks.bench_train [--steps N] [--out DIR]  # table + results/train_step-*.md

On CUDA: the shakespeare-char preset at batch 64 on every backend; elsewhere: cpu-baby on the
torch and reference backends.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

from benchmarks.report import environment, peak_tflops, write_report
from tinygpt.config import from_preset
from tinygpt.model import build_model
from tinygpt.ops import precision
from tinygpt.train import make_optimizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = "shakespeare-char" if DEVICE.type == "cuda" else "cpu-baby"
BACKENDS = ("reference", "torch", "triton") if DEVICE.type == "cuda" else ("reference", "torch")


def make_step(preset: str, backend: str, compile: bool = False, device: torch.device = DEVICE):
    """A closure running one full training step (synchronised), tokens per step, and training
    FLOPs per step."""
    model_cfg, cfg = from_preset(preset, backend=backend)
    torch.manual_seed(0)
    model = build_model(model_cfg, backend).to(device)
    optimizer = make_optimizer(model, cfg, device)
    step_model = torch.compile(model) if compile else model
    amp_dtype, _ = precision(device)
    x, y = torch.randint(0, model_cfg.vocab_size, (2, cfg.batch_size, model_cfg.block_size),
                         device=device)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    tokens = cfg.batch_size * model_cfg.block_size
    return step, tokens, tokens * model.flops_per_token()


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step(benchmark, backend):
    step, tokens, _ = make_step(PRESET, backend)
    for _ in range(3):
        step()
    benchmark.extra_info.update(preset=PRESET, device=str(DEVICE), tokens_per_step=tokens)
    benchmark.pedantic(step, rounds=30, iterations=1)


def measure(step, steps: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per provider")
    parser.add_argument("--out", default="benchmarks/results", help="where the report goes")
    args = parser.parse_args()
    rows = []
    variants = [(b, False) for b in BACKENDS]
    if DEVICE.type == "cuda":
        variants += [("torch", True), ("triton", True)]
    peak = peak_tflops()
    for backend, compiled in variants:
        step, tokens, flops = make_step(PRESET, backend, compiled)
        times = measure(step, args.steps, warmup=20 if compiled else 5)
        ms = 1000 * statistics.median(times)
        mem = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else None
        achieved = flops / ms / 1e9  # TFLOP/s
        rows.append([f"{backend}{' + compile' if compiled else ''}", f"{ms:.2f}",
                     f"{1000 * min(times):.2f}", f"{tokens / ms * 1000:,.0f}", f"{achieved:.2f}",
                     f"{100 * achieved / peak:.1f}%" if peak else "n/a",
                     f"{mem:.2f}" if mem is not None else "n/a"])
        print(" | ".join(rows[-1]), flush=True)
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
    baseline = {row[0]: float(row[1]) for row in rows}
    for row in rows:
        others = [n for n in ("reference", "torch", "torch + compile") if n in baseline]
        row.append(" ".join(f"{baseline[n] / float(row[1]):.2f}x {n}" for n in others
                            if n != row[0]))
    write_report(
        args.out, "train_step",
        f"Training step, {PRESET} preset ({DEVICE.type}), median of {args.steps} steps",
        ["provider", "median ms/iter", "min ms/iter", "tokens/s", "TFLOP/s", "MFU",
         "peak GiB", "speed-up vs"], rows, environment(),
        notes=f"MFU = achieved training FLOP/s over the device's dense bf16 peak "
              f"({peak or 'unknown'} TFLOP/s); FLOPs per token from GPT.flops_per_token().")


if __name__ == "__main__":
    main()
