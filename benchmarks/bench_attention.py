"""Attention benchmark: fused Triton vs F.scaled_dot_product_attention vs the reference math.

    python -m benchmarks.bench_attention [--dtypes bfloat16 float16] [--out DIR]
    python -m pytest benchmarks/bench_attention.py --benchmark-enable

FLOPs: forward 4*B*H*T*T*D (two matmuls), halved when causal; forward+backward counts the
backward as 2.5x the forward, so 3.5x in all. Peak memory is what one forward+backward allocates
beyond its inputs. Shapes: the model's (B=64, H=6, T=256, D=64), with and without its dropout,
and a sweep of T at 16K tokens per batch with H*D = 2048 (FlashAttention's convention).
Without CUDA it says so and times the torch providers on a small CPU shape.
"""

from __future__ import annotations

import argparse
import contextlib

import pytest
import torch
import torch.nn.functional as F
from tinygpt.kernels import attention
from tinygpt.kernels.reference import attention_reference
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.report import CUDA, environment, median_ms, plot, synchronized, write_report

DEVICE = "cuda" if CUDA else "cpu"
MODEL = dict(B=64, H=6, T=256, D=64)
SWEEP_T = [512, 1024, 2048, 4096, 8192, 16384]
REFERENCE_MAX_T = 4096  # the reference stores B*H*T*T scores: beyond this it would not fit


def sdpa_flash(q, k, v, dropout_p=0.0):
    """SDPA restricted to its flash backend on CUDA (the default choice elsewhere)."""
    ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if CUDA else contextlib.nullcontext()
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


PROVIDERS = {
    "triton": lambda q, k, v, p: attention(q, k, v, causal=True, dropout_p=p),
    "sdpa (flash)": lambda q, k, v, p: sdpa_flash(q, k, v, p),
    "reference": lambda q, k, v, p: attention_reference(q, k, v, causal=True, dropout_p=p),
}


def available_providers(T: int) -> list[str]:
    names = list(PROVIDERS) if CUDA else ["sdpa (flash)", "reference"]
    return [n for n in names if n != "reference" or T <= REFERENCE_MAX_T]


def make_case(B, H, T, D, dtype, mode, provider, dropout_p=0.0):
    q, k, v = (torch.randn(B, H, T, D, device=DEVICE, dtype=dtype, requires_grad=mode != "fwd")
               for _ in range(3))
    fn = PROVIDERS[provider]
    if mode == "fwd":
        return (lambda: fn(q, k, v, dropout_p)), None
    do = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)
    return (lambda: fn(q, k, v, dropout_p).backward(do)), [q, k, v]


def flops(B, H, T, D, mode) -> float:
    forward = 4 * B * H * T * T * D / 2  # causal: half the score matrix
    return forward * (1.0 if mode == "fwd" else 3.5)


def peak_mib(step) -> float:
    if not CUDA:
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", available_providers(MODEL["T"]))
def test_attention_model_shape(benchmark, provider, mode):
    shape = MODEL if CUDA else dict(MODEL, B=4)
    dtype = torch.bfloat16 if CUDA else torch.float32
    step, grads = make_case(**shape, dtype=dtype, mode=mode, provider=provider)
    benchmark.extra_info.update(shape=shape, dtype=str(dtype), device=DEVICE)
    benchmark(synchronized(step, grads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+",
                        default=["bfloat16", "float16"] if CUDA else ["float32"])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not CUDA:
        print("No CUDA device: timing SDPA and the reference on a small CPU shape only (the "
              "Triton kernels run here only in their interpreter, which is not a speed).")
    cases = [("model", MODEL, 0.0), ("model, dropout 0.2", MODEL, 0.2)]
    if CUDA:
        for D in (64, 128):
            cases += [("sweep", dict(B=16384 // T, H=2048 // D, T=T, D=D), 0.0) for T in SWEEP_T]
    else:
        small = dict(MODEL, B=4)
        cases = [("model (B=4)", small, 0.0), ("model (B=4), dropout 0.2", small, 0.2)]
    rows, series = [], {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for label, shape, p in cases:
            for mode in ("fwd", "fwd+bwd"):
                results = {}
                for provider in available_providers(shape["T"]):
                    step, grads = make_case(**shape, dtype=dtype, mode=mode, provider=provider,
                                            dropout_p=p)
                    ms = median_ms(step, grad_to_none=grads)
                    mem = peak_mib(step) if mode == "fwd+bwd" else float("nan")
                    results[provider] = ms
                    tflops = flops(**shape, mode=mode) / ms / 1e9
                    mem_text = "n/a" if mem != mem else f"{mem:.0f}"  # NaN: not measured
                    rows.append([label, "{B}x{H}x{T}x{D}".format(**shape), dtype_name, mode,
                                 provider, f"{ms:.3f}", f"{tflops:.3g}", mem_text, ""])
                    print(" | ".join(rows[-1][:8]), flush=True)
                    if label == "sweep" and dtype_name == args.dtypes[0]:
                        series.setdefault(f"{provider} D={shape['D']} {mode}", []).append(
                            (shape["T"], tflops))
                competitor = results.get("sdpa (flash)")
                for row in rows[-len(results):]:
                    row[-1] = f"{competitor / float(row[5]):.2f}x" if competitor else ""
    path = write_report(
        args.out, "attention", f"Causal attention: Triton vs SDPA vs reference ({DEVICE})",
        ["case", "BxHxTxD", "dtype", "mode", "provider", "median ms", "TFLOP/s",
         "peak MiB (fwd+bwd)", "vs SDPA"], rows, environment(),
        notes=f"The reference is skipped above T={REFERENCE_MAX_T} (its T x T scores would not "
              f"fit).",
    )
    plot(path.with_suffix(".png"), f"Causal attention throughput ({args.dtypes[0]}, 16K tokens)",
         "sequence length T", "TFLOP/s", series)


if __name__ == "__main__":
    main()
