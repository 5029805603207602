"""Compile every Triton kernel configuration for a GPU without having one, and report resources.

    python -m benchmarks.compile_check [--arch 90] [--quick] [--out DIR]

Triton compiles ahead of time for any NVIDIA target with the ptxas it ships. For each
specialization the launchers can pick (dtype, head dim, causal, dropout; LayerNorm row widths)
this reports registers per thread, spilled bytes (stack/local), shared memory, and whether the
kernel fits the target (shared memory within the per-block limit). Registers at 255 with a
stack mean spills: slow on the GPU. It must run without TRITON_INTERPRET (the interpreter
replaces the kernels with Python).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.report import environment, write_report

SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376}  # bytes per block (opt-in maximum)
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

attention = importlib.import_module("tinygpt.kernels.attention")
layernorm = importlib.import_module("tinygpt.kernels.layernorm")


def resources(cubin: bytes) -> dict[str, int]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    found = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", text))
    return {k: int(v) for k, v in found.items()}


def compile_kernel(fn, pointers: dict[str, str], ints: list[str], floats: list[str],
                   constexprs: dict, launch: dict, arch: int) -> dict:
    """Compile as a launch on typical tensors would: the last dimension contiguous (its stride
    specialised to 1), pointers and the other strides divisible by 16."""
    unit = {n: 1 for n in ints if n.startswith("stride_") and n.endswith("d")}
    ints = [n for n in ints if n not in unit]
    constexprs = {**constexprs, **unit}
    signature = {**pointers, **{n: "i32" for n in ints}, **{n: "fp32" for n in floats},
                 **{n: "constexpr" for n in constexprs}}
    aligned = set(pointers) | {n for n in ints if n.startswith("stride_")}
    params = [p.name for p in fn.params]
    attrs = {(params.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                      attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={k: v for k, v in launch.items() if k.startswith("num_")})
    usage = resources(kernel.asm["cubin"])
    spill = usage.get("STACK", 0) + usage.get("LOCAL", 0)
    return {"registers": usage.get("REG", 0), "spill": spill, "shared": kernel.metadata.shared}


def strides(*names: str) -> list[str]:
    return [f"stride_{n}{d}" for n in names for d in "bhtd"]


def _blocks(launch: dict) -> dict:
    return {k: v for k, v in launch.items() if k.startswith("BLOCK")}


def attention_cases(quick: bool):
    dtypes = [torch.bfloat16] if quick else list(TRITON_TYPES)
    head_dims = [64, 128] if quick else list(attention.HEAD_DIMS)
    causals = [True] if quick else [True, False]
    for dtype, D, causal, dropout in itertools.product(dtypes, head_dims, causals, [False, True]):
        t = TRITON_TYPES[dtype]
        common = dict(CAUSAL=causal, DROPOUT=dropout, HEAD_DIM=D,
                      PRECISION=attention._precision(dtype))
        case = f"{t} D={D} {'causal' if causal else 'full'}{' dropout' if dropout else ''}"
        fwd = attention._fwd_config(D, dtype)
        yield (f"attention fwd, {case}", attention._attn_fwd_kernel,
               dict(Q=f"*{t}", K=f"*{t}", V=f"*{t}", O=f"*{t}", LSE="*fp32", Seed="*i64"),
               strides("q", "k", "v", "o") + ["H", "T", "S"], ["qk_scale", "dropout_p"],
               {**common, **_blocks(fwd)}, fwd)
        dkdv, dq = attention._bwd_configs(D, dtype)
        ptrs = dict(Q=f"*{t}", K=f"*{t}", V=f"*{t}", DO=f"*{t}", LSE="*fp32", Delta="*fp32",
                    Seed="*i64")
        ints = strides("q", "k", "v", "do") + ["H", "T", "S"]
        floats = ["scale", "qk_scale", "dropout_p"]
        yield (f"attention dK/dV, {case}", attention._attn_bwd_dkdv_kernel,
               {**ptrs, "DK": f"*{t}", "DV": f"*{t}"}, ints, floats, {**common, **_blocks(dkdv)},
               dkdv)
        yield (f"attention dQ, {case}", attention._attn_bwd_dq_kernel, {**ptrs, "DQ": f"*{t}"},
               ints, floats, {**common, **_blocks(dq)}, dq)


def layernorm_cases(quick: bool):
    widths = [384, 4096] if quick else [128, 384, 1024, 4096, 16384, 65536]
    for N in widths:
        block_m, block_n, warps = layernorm._launch_config(N)
        const = dict(HAS_W=True, HAS_B=True, BLOCK_M=block_m, BLOCK_N=block_n)
        yield (f"layernorm fwd, bf16 N={N}", layernorm._layer_norm_fwd_kernel,
               dict(X="*bf16", Y="*bf16", W="*bf16", B="*bf16", Mean="*fp32", Rstd="*fp32"),
               ["stride_x", "stride_y", "M", "N"], ["eps"], const, dict(num_warps=warps))
        const = dict(HAS_W=True, BLOCK_M=block_m, BLOCK_N=block_n)
        yield (f"layernorm bwd, bf16 N={N}", layernorm._layer_norm_bwd_kernel,
               dict(DY="*bf16", X="*bf16", W="*bf16", Mean="*fp32", Rstd="*fp32", DX="*bf16",
                    DW_part="*fp32", DB_part="*fp32"),
               ["stride_dy", "stride_x", "stride_dx", "M", "N"], [], const, dict(num_warps=warps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    parser.add_argument("--quick", action="store_true",
                        help="the model's kernels only: bf16, causal, D 64 and 128, two LayerNorms")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    rows, problems = [], []
    cases = [*attention_cases(args.quick), *layernorm_cases(args.quick)]
    for label, fn, pointers, ints, floats, constexprs, launch in cases:
        usage = compile_kernel(fn, pointers, ints, floats, constexprs, launch, args.arch)
        fits = usage["shared"] <= SHARED_LIMIT.get(args.arch, 232448)
        settings = " ".join(f"{k}={v}" for k, v in launch.items())
        rows.append([label, settings, usage["registers"], usage["spill"], usage["shared"],
                     "yes" if fits else "NO"])
        print(" | ".join(map(str, rows[-1])), flush=True)
        if not fits or usage["spill"]:
            problems.append(label)
    write_report(
        args.out, f"compile-sm{args.arch}", f"Triton kernels compiled for sm_{args.arch} (no GPU)",
        ["kernel, specialization", "launch", "registers", "spilled bytes", "shared bytes", "fits"],
        rows, environment(),
        notes=f"{len(rows)} kernels; with spills or over the shared-memory limit: "
              f"{', '.join(problems) or 'none'}.")
    if any(row[-1] == "NO" for row in rows):
        raise SystemExit("some kernels do not fit the target")


if __name__ == "__main__":
    main()
