"""Time neighbouring launch settings of the attention kernels, to choose the defaults on a GPU.

    python -m benchmarks.tune_attention [--out DIR]      # CUDA only

The defaults in kernels/attention.py (`launch_settings`) were chosen as the largest tiles that
compile without register spills (benchmarks/compile_check.py), untimed. This
script times each candidate below, forward and forward+backward, in bf16 at the model's shape and
at two long-sequence shapes, and marks the fastest per shape and mode. Candidates that do not
compile, or do not fit, are reported as such.
"""

from __future__ import annotations

import argparse
import importlib

import torch
from tinygpt.kernels import attention

from benchmarks.report import CUDA, environment, median_ms, write_report

module = importlib.import_module("tinygpt.kernels.attention")
gpu = importlib.import_module("tinygpt.kernels.gpu")
DEVICE = "cuda"

SHAPES = [dict(B=64, H=6, T=256, D=64), dict(B=4, H=32, T=4096, D=64),
          dict(B=4, H=16, T=4096, D=128)]
# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates; the diagonal passes need the larger
# block to be a multiple of the smaller one.
FORWARD = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3),
           (128, 64, 8, 4), (128, 64, 8, 2)]
DKDV = [(32, 128, 8, 3), (32, 64, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (32, 128, 4, 3),
        (32, 128, 8, 4)]
DQ = [(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4)]


def as_launch(c: tuple) -> dict:
    return dict(BLOCK_M=c[0], BLOCK_N=c[1], num_warps=c[2], num_stages=c[3])


def time_case(shape: dict, mode: str) -> float:
    q, k, v = (torch.randn(shape["B"], shape["H"], shape["T"], shape["D"], device=DEVICE,
                           dtype=torch.bfloat16, requires_grad=mode != "fwd") for _ in range(3))
    if mode == "fwd":
        return median_ms(lambda: attention(q, k, v))
    do = torch.randn_like(q)
    return median_ms(lambda: attention(q, k, v).backward(do), grad_to_none=[q, k, v])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if not CUDA:
        raise SystemExit("tune_attention times kernels on a CUDA device; none is present")
    defaults = module.launch_settings
    rows = []
    for shape in SHAPES:
        label = "{B}x{H}x{T}x{D}".format(**shape)
        fwd_d, dkdv_d, dq_d = defaults(shape["D"], torch.bfloat16,
                                       gpu.target(torch.device(DEVICE)))
        trials = [("fwd", as_launch(f), (dkdv_d, dq_d)) for f in FORWARD]
        trials += [("fwd+bwd", fwd_d, (as_launch(a), dq_d)) for a in DKDV]
        trials += [("fwd+bwd", fwd_d, (dkdv_d, as_launch(b))) for b in DQ]
        results = []
        for mode, fwd, bwd in trials:
            module.launch_settings = lambda D, dtype, target, fwd=fwd, bwd=bwd: (fwd, *bwd)
            try:
                ms = time_case(shape, mode)
            except Exception as e:  # out of resources, say: report and go on
                ms, note = float("inf"), f"failed: {type(e).__name__}: {str(e)[:60]}"
            else:
                note = ""
            setting = (f"fwd {tuple(fwd.values())}" if mode == "fwd" else
                       f"dkdv {tuple(bwd[0].values())} dq {tuple(bwd[1].values())}")
            results.append([label, mode, setting, ms, note])
            print(label, mode, setting, f"{ms:.3f} ms", note, flush=True)
        module.launch_settings = defaults
        for mode in ("fwd", "fwd+bwd"):
            best = min(r[3] for r in results if r[1] == mode)
            for r in results:
                if r[1] == mode:
                    rows.append([r[0], r[1], r[2], f"{r[3]:.3f}", f"{best / r[3]:.2f}",
                                 r[4] or ("fastest" if r[3] == best else "")])
    write_report(args.out, "tune-attention", "Attention launch settings, bf16, timed",
                 ["shape", "mode", "setting (BLOCK_M, BLOCK_N, warps, stages)", "median ms",
                  "speed vs best", "note"], rows, environment(),
                 notes="Settings are (BLOCK_M, BLOCK_N, num_warps, num_stages). The fwd rows use "
                       "the default backward settings; the fwd+bwd rows the default forward.")


if __name__ == "__main__":
    main()
