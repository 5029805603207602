"""Time neighbouring launch settings of the attention kernels, to choose the defaults on a GPU.

    python -m benchmarks.tools.tune_attention [--out DIR]      # CUDA only

The defaults in kernels/flash_attention.py (`SETTINGS`) were chosen as the largest tiles that
compile without register spills (benchmarks/tools/compile_check.py), untimed. This script times each
candidate below in bf16, forward and forward+backward, with dropout off and at the training
dropout 0.2, at the model's shape and at two long-sequence shapes, and marks the fastest per
shape, dropout and mode. Before a candidate is timed, its output and every gradient are checked
against the fp64 reference (with the same dropout mask) at T = 999, which is not a multiple of
any block: an error above twice (output) or three times (gradients) that of the same reference
computed in bf16, or a non-finite value, rejects it.
Candidates that do not compile, or do not fit, are reported as such. The fastest is chosen by
the back-to-back time (what training sees); the L2-flushed time stands beside it.
"""

from __future__ import annotations

import argparse

import torch
from tinygpt.kernels import attention, attention_dropout_mask, gpu
from tinygpt.kernels import flash_attention as module
from tinygpt.kernels.reference import attention_reference

from benchmarks.report import (
    CUDA,
    Interruptible,
    Timing,
    add_out_argument,
    environment,
    ratio,
    release_memory,
    skip_reason,
    time_ms,
    write_report,
)

DEVICE = "cuda"
CHECK_T = 999  # the correctness check's length: not a multiple of any block
TRAINING_DROPOUT = 0.2

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


def time_case(shape: dict, mode: str, p: float) -> Timing:
    q, k, v = (torch.randn(shape["B"], shape["H"], shape["T"], shape["D"], device=DEVICE,
                           dtype=torch.bfloat16, requires_grad=mode != "fwd") for _ in range(3))
    if mode == "fwd":
        return time_ms(lambda: attention(q, k, v, dropout_p=p))
    do = torch.randn_like(q)
    return time_ms(lambda: attention(q, k, v, dropout_p=p).backward(do), grad_to_none=[q, k, v])


def wrong(D: int, p: float, T: int = CHECK_T, dtype=torch.bfloat16, device=DEVICE
          ) -> str | None:
    """Why the current launch settings compute attention wrongly at head dim D and dropout p,
    or None: output and gradients (B=2, H=3) against the fp64 reference given the kernels' own
    dropout mask, held to 2x (output) and 3x (gradients) the error of the same reference
    computed in `dtype`, plus 1e-2."""
    B, H, seed = 2, 3, 1234
    gen = torch.Generator(device=device).manual_seed(D)
    q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
                   for _ in range(4))
    mask = attention_dropout_mask(B, H, T, T, p, seed, device=device) if p else None

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(do.to(out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    ours = run(lambda q, k, v: attention(q, k, v, dropout_p=p, seed=seed))
    low, exact = (run(lambda q, k, v, u=upcast: attention_reference(
        q, k, v, dropout_p=p, dropout_mask=mask, upcast=u)) for upcast in (None, torch.float64))
    for name, o, lo, e, factor in zip(("out", "dq", "dk", "dv"), ours, low, exact, (2, 3, 3, 3)):
        err = (o.double() - e).abs().max().item()
        allowed = factor * (lo.double() - e).abs().max().item() + 1e-2
        if not torch.isfinite(o).all() or err > allowed:
            return f"{name} off by {err:.3g} (allowed {allowed:.3g})"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    args = parser.parse_args()
    if not CUDA:
        raise SystemExit("tune_attention times kernels on a CUDA device; none is present")
    defaults = module.launch_settings
    checked = {}  # (D, dropout, settings) -> None or why the settings are wrong
    results = []  # (shape label, dropout, mode, setting, Timing or None, note)
    with Interruptible() as run:
        for shape, p in [(s, p) for s in SHAPES for p in (0.0, TRAINING_DROPOUT)]:
            label = "{B}x{H}x{T}x{D}".format(**shape)
            fwd_d, dkdv_d, dq_d = defaults(shape["D"], torch.bfloat16,
                                           gpu.target(torch.device(DEVICE)))
            trials = [("fwd", as_launch(f), (dkdv_d, dq_d)) for f in FORWARD]
            trials += [("fwd+bwd", fwd_d, (as_launch(a), dq_d)) for a in DKDV]
            trials += [("fwd+bwd", fwd_d, (dkdv_d, as_launch(b))) for b in DQ]
            for mode, fwd, bwd in trials:
                module.launch_settings = lambda D, dtype, target, fwd=fwd, bwd=bwd: (fwd, *bwd)
                setting = (f"fwd {tuple(fwd.values())}" if mode == "fwd" else
                           f"dkdv {tuple(bwd[0].values())} dq {tuple(bwd[1].values())}")
                timing, note = None, ""
                try:
                    key = (shape["D"], p, str(fwd), str(bwd))
                    if key not in checked:
                        checked[key] = wrong(shape["D"], p)
                    if checked[key]:
                        note = f"rejected: {checked[key]}"
                    else:
                        timing = time_case(shape, mode, p)
                except Exception as e:  # out of resources, say: report and go on
                    note = f"failed: {skip_reason(e)}"
                finally:
                    module.launch_settings = defaults
                    release_memory()
                results.append((label, p, mode, setting, timing, note))
                print(label, f"p={p:g}", mode, setting, timing, note, flush=True)
    rows = []
    for group in dict.fromkeys(r[:3] for r in results):  # (shape, dropout, mode), in run order
        timed = [r[4] for r in results if r[:3] == group and r[4] is not None]
        best = min(timed, key=lambda t: t.back_to_back, default=None)
        for label, p, mode, setting, timing, note in (r for r in results if r[:3] == group):
            if timing is None:
                rows.append([label, f"{p:g}", mode, setting, "-", "-", "-", note])
                continue
            rows.append([label, f"{p:g}", mode, setting, f"{timing.flushed:.3f}",
                         f"{timing.back_to_back:.3f}", ratio(best, timing),
                         "fastest" if timing is best else ""])
    write_report(args.out, "tune-attention", "Attention launch settings, bf16, timed",
                 ["shape", "dropout", "mode", "setting (BLOCK_M, BLOCK_N, warps, stages)",
                  "ms flushed", "ms back-to-back", "speed vs best", "note"], rows,
                 environment(),
                 notes="Settings are (BLOCK_M, BLOCK_N, num_warps, num_stages). The fwd rows use "
                       "the default backward settings; the fwd+bwd rows the default forward. "
                       "Speed vs best: the fastest setting's time over the row's (back-to-back, "
                       "flushed in brackets).",
                 interrupted=run.interrupted)
    run.exit_if_interrupted()


if __name__ == "__main__":
    main()
