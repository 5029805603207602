"""LayerNorm benchmark: fused Triton vs F.layer_norm (eager and torch.compile'd).

    python -m benchmarks.bench_layernorm [--dtype bfloat16] [--out DIR]   # table + plot
    python -m pytest benchmarks/bench_layernorm.py --benchmark-enable      # pytest-benchmark

Bytes moved per element: forward reads x and writes y (2), backward reads x and dy and writes dx
(3); fwd+bwd counts 5. GB/s is set against the device's copy bandwidth measured in the same run.
Without CUDA it says so and times only the torch providers, on the CPU.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from tinygpt.kernels import layer_norm

from benchmarks.report import (
    CUDA,
    copy_bandwidth_gbs,
    environment,
    median_ms,
    plot,
    synchronized,
    write_report,
)

DEVICE = "cuda" if CUDA else "cpu"
MODEL_SHAPE = (64 * 256, 384)  # batch 64 x block 256 rows of the shakespeare-char width
SWEEP = [(65536, 128), (65536, 256), (65536, 512), (65536, 1024), (32768, 2048), (16384, 4096),
         (8192, 8192), (4096, 16384)]
CPU_SHAPES = [(4096, 128), (2048, 384), (1024, 1024)]


def providers() -> dict:
    torch_ln = lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b)  # noqa: E731
    found = {"torch": torch_ln}
    if CUDA:
        found = {"triton": layer_norm, **found, "torch.compile": torch.compile(torch_ln)}
    return found


def make_case(M: int, N: int, dtype: torch.dtype, mode: str, fn):
    x = torch.randn(M, N, device=DEVICE, dtype=dtype, requires_grad=mode != "fwd")
    w = torch.randn(N, device=DEVICE, dtype=dtype, requires_grad=mode != "fwd")
    b = torch.randn(N, device=DEVICE, dtype=dtype, requires_grad=mode != "fwd")
    dy = torch.randn_like(x)
    if mode == "fwd":
        return (lambda: fn(x, w, b)), None
    return (lambda: fn(x, w, b).backward(dy)), [x, w, b]


def bytes_moved(M: int, N: int, dtype: torch.dtype, mode: str) -> int:
    per_element = {"fwd": 2, "fwd+bwd": 5}[mode]
    return per_element * M * N * torch.finfo(dtype).bits // 8


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", list(providers()))
def test_layer_norm(benchmark, provider, mode):
    M, N = MODEL_SHAPE if CUDA else CPU_SHAPES[1]
    dtype = torch.bfloat16 if CUDA else torch.float32
    step, grads = make_case(M, N, dtype, mode, providers()[provider])
    benchmark.extra_info.update(shape=(M, N), dtype=str(dtype), device=DEVICE)
    benchmark(synchronized(step, grads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16" if CUDA else "float32",
                        choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if not CUDA:
        print("No CUDA device: timing only the torch provider on the CPU (the Triton kernel runs "
              "here only in its interpreter, which is not a speed).")
    ceiling = copy_bandwidth_gbs()
    print(f"measured copy bandwidth: {ceiling:,.0f} GB/s")
    shapes = [MODEL_SHAPE] + SWEEP if CUDA else CPU_SHAPES
    rows, series = [], {}
    for M, N in shapes:
        for mode in ("fwd", "fwd+bwd"):
            baseline = None
            for name, fn in providers().items():
                step, grads = make_case(M, N, dtype, mode, fn)
                ms = median_ms(step, grad_to_none=grads)
                gbs = bytes_moved(M, N, dtype, mode) / ms / 1e6
                baseline = ms if name == "torch" else baseline
                rows.append([f"{M}x{N}", args.dtype, mode, name, f"{ms:.4f}", f"{gbs:,.0f}",
                             f"{100 * gbs / ceiling:.0f}%", ""])
                if (M, N) != MODEL_SHAPE:
                    series.setdefault(f"{name} {mode}", []).append((N, gbs))
                print(" | ".join(rows[-1][:7]), flush=True)
            for row in rows[-len(providers()):]:  # speed-up against F.layer_norm eager
                row[-1] = f"{baseline / float(row[4]):.2f}x"
    path = write_report(
        args.out, "layernorm", f"LayerNorm: Triton vs F.layer_norm ({DEVICE}, {args.dtype})",
        ["shape (rows x N)", "dtype", "mode", "provider", "median ms", "GB/s", "of copy BW",
         "vs torch eager"], rows, environment(),
        notes=f"Copy bandwidth measured in this run: {ceiling:,.0f} GB/s (read + write).",
    )
    plot(path.with_suffix(".png"), f"LayerNorm throughput ({args.dtype})", "N (features)",
         "GB/s", series)


if __name__ == "__main__":
    main()
