"""Compile every Triton kernel configuration for GPUs without having one, and report resources.

    python -m benchmarks.tools.compile_check [--arch 80 86 89 90 120] [--quick] [--head-dims D ...]
                                             [--jobs N] [--out DIR] [--baseline EARLIER_REPORT.md]

Triton compiles ahead of time for any NVIDIA target with the ptxas it ships. For each target and
each specialization the launchers pick there (dtype, head dim, causal, dropout; LayerNorm row
widths) this reports registers per thread, spilled bytes (stack/local) with the loads and stores
that move them (all, and those inside a loop), shared memory against the target's per-block
limit, and the static instruction count of the machine code (cuobjdump -sass, NOPs excluded),
with the ratio of each dropout kernel to the same kernel without dropout, and beside them the
counts of an earlier report (`--baseline`) for the same target and kernel. Spill traffic in a
loop is paid every iteration: slow on the GPU; a value parked before the loop and read back after
it costs two instructions a program. It must run without TRITON_INTERPRET (the interpreter
replaces the kernels with Python).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import multiprocessing
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from tinygpt.kernels import flash_attention as attention
from tinygpt.kernels import gpu, layernorm
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.report import Rows, add_out_argument, environment, write_report

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
ARCHS = (80, 86, 89, 90, 120)  # A100; RTX 30xx, A10; L4, RTX 40xx; H100, H200; RTX 50xx
# Head dims: each padded width the kernels compute with (16 to 256), and two padded ones.
HEAD_DIMS = (16, 24, 32, 64, 96, 128, 256)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) for each non-NOP instruction of `cuobjdump -sass` output."""
    # Instruction lines look like "        /*0a40*/   FFMA R3, R2, R5, R3 ;  /* 0x... */".
    code = (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*([^;]*)", line) for line in sass.splitlines())
    return [(int(m[1], 16), m[2].strip()) for m in code if m and "NOP" not in m[2].split()]


def spill_traffic(code: list[tuple[int, str]]) -> tuple[int, int]:
    """Local-memory loads and stores (LDL, STL): all, and those inside a loop, which spans a
    branch back to an earlier address and that address."""
    loops = [(int(target[-1], 16), address) for address, op in code
             if re.search(r"\bBRA\b", op) and (target := re.findall(r"0x[0-9a-f]+", op))
             and int(target[-1], 16) < address]
    spills = [address for address, op in code if re.search(r"\b(?:LDL|STL)\b", op)]
    return len(spills), sum(any(lo <= a <= hi for lo, hi in loops) for a in spills)


def resources(cubin: bytes) -> dict[str, int]:
    """Registers, stack/local bytes, static SASS instructions and spill loads/stores (all, in
    loops) of a cubin."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", text)}
    code = instructions(_cuobjdump(cubin, "-sass"))
    usage["SASS"] = len(code)
    usage["SPILL_OPS"], usage["SPILL_OPS_IN_LOOPS"] = spill_traffic(code)
    return usage


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
    return {"registers": usage.get("REG", 0),
            "spill": usage.get("STACK", 0) + usage.get("LOCAL", 0),
            "spill_ops": usage["SPILL_OPS"], "spill_ops_in_loops": usage["SPILL_OPS_IN_LOOPS"],
            "shared": kernel.metadata.shared, "instructions": usage["SASS"]}


def strides(*names: str) -> list[str]:
    return [f"stride_{n}{d}" for n in names for d in "bhtd"]


def _blocks(launch: dict) -> dict:
    return {k: v for k, v in launch.items() if k.startswith("BLOCK")}


def attention_cases(quick: bool, arch: int, head_dims: list[int] | None):
    """(label, kernel, pointers, ints, floats, constexprs, launch) for every attention kernel."""
    target = gpu.Target(arch, gpu.SHARED_MEMORY[arch])
    dtypes = [torch.bfloat16] if quick else list(TRITON_TYPES)
    head_dims = head_dims or ([64, 128] if quick else list(HEAD_DIMS))
    causals = [True] if quick else [True, False]
    for dtype, D, causal, dropout in itertools.product(dtypes, head_dims, causals, [False, True]):
        t = TRITON_TYPES[dtype]
        common = dict(CAUSAL=causal, DROPOUT=dropout, HEAD_DIM=D, BLOCK_D=attention.block_d(D),
                      PRECISION=attention._precision(dtype))
        case = f"{t} D={D} {'causal' if causal else 'full'}{' dropout' if dropout else ''}"
        fwd, dkdv, dq = attention.launch_settings(D, dtype, target)
        yield (f"attention fwd, {case}", attention._attn_fwd_kernel,
               dict(Q=f"*{t}", K=f"*{t}", V=f"*{t}", O=f"*{t}", LSE="*fp32", Seed="*i64"),
               strides("q", "k", "v", "o") + ["H", "T", "S", "threshold"],
               ["qk_scale", "keep_scale"], {**common, **_blocks(fwd)}, fwd)
        ptrs = dict(Q=f"*{t}", K=f"*{t}", V=f"*{t}", DO=f"*{t}", LSE="*fp32", Delta="*fp32",
                    Seed="*i64")
        scalars = ["H", "T", "S", "threshold"]
        floats = ["scale", "qk_scale", "keep_scale"]
        yield (f"attention dK/dV, {case}", attention._attn_bwd_dkdv_kernel,
               {**ptrs, "DK": f"*{t}", "DV": f"*{t}"},
               strides("q", "k", "v", "do", "dk") + scalars, floats,
               {**common, **_blocks(dkdv)}, dkdv)
        yield (f"attention dQ, {case}", attention._attn_bwd_dq_kernel, {**ptrs, "DQ": f"*{t}"},
               strides("q", "k", "v", "do", "dq") + scalars, floats, {**common, **_blocks(dq)},
               dq)
    for dtype, D in itertools.product(dtypes, head_dims):  # delta: no causal, no dropout
        t = TRITON_TYPES[dtype]
        yield (f"attention delta, {t} D={D}", attention._attn_bwd_delta_kernel,
               dict(O=f"*{t}", DO=f"*{t}", Delta="*fp32"), strides("o", "do") + ["H", "T"],
               ["keep_prob"], dict(HEAD_DIM=D, BLOCK_D=attention.block_d(D),
                                   BLOCK_M=attention.delta_rows(D)), dict(num_warps=4))


def layernorm_cases(quick: bool, arch: int):
    """The LayerNorm kernels as the model launches them under bf16 autocast: the add+LayerNorm
    (bf16 branch + fp32 residual -> fp32 residual, bf16 output) and the plain one (fp32 in, bf16
    out), forward and backward, at one-tile widths and in column tiles (any wider N compiles
    the same)."""
    narrow = [384] if quick else [128, 384, 1024, layernorm.ROW_IN_REGISTERS]
    tiled = layernorm.ROW_IN_REGISTERS + 1
    for N, add in itertools.product([*narrow, tiled], [True] if quick else [True, False]):
        block_m, block_n, warps = layernorm._launch_config(N)
        blocks = dict(TILED=N == tiled, BLOCK_M=block_m, BLOCK_N=block_n)
        launch = dict(num_warps=warps)
        width = f"N>{layernorm.ROW_IN_REGISTERS} (tiles of {block_n})" if N == tiled else f"N={N}"
        name = "add+layernorm" if add else "layernorm"
        yield (f"{name} fwd, {width}", layernorm._fwd_kernel,
               dict(X="*bf16" if add else "*fp32", R="*fp32", H="*fp32", Y="*bf16", W="*fp32",
                    B="*fp32", Mean="*fp32", Rstd="*fp32"),
               ["stride_x", "stride_r", "stride_h", "stride_y", "M", "N"], ["eps"],
               dict(HAS_R=add, HAS_W=True, HAS_B=True, **blocks), launch)
        if N == tiled and add:
            yield (f"layernorm bwd row sums, {width}", layernorm._bwd_row_sums_kernel,
                   dict(DY="*bf16", H="*fp32", W="*fp32", Mean="*fp32", Rstd="*fp32",
                        RowSums="*fp32"),
                   ["stride_dy", "stride_h", "M", "N"], [],
                   dict(HAS_W=True, BLOCK_M=block_m, BLOCK_N=block_n), launch)
        yield (f"{name} bwd, {width}", layernorm._bwd_kernel,
               dict(DY="*bf16", H="*fp32", DH="*fp32", W="*fp32", Mean="*fp32", Rstd="*fp32",
                    RowSums="*fp32", DX="*bf16" if add else "*fp32", DR="*fp32",
                    DW_part="*fp32", DB_part="*fp32"),
               ["stride_dy", "stride_h", "stride_dh", "stride_dx", "stride_dr", "M", "N"], [],
               dict(HAS_DH=add, HAS_W=True, HAS_B=True, STORE_DR=add, **blocks), launch)
    block_g, block_n = layernorm.SUM_BLOCK
    yield ("layernorm dw/db sum", layernorm._sum_partials_kernel,
           dict(DW_part="*fp32", DB_part="*fp32", DW="*fp32", DB="*fp32"), ["G", "N"], [],
           dict(HAS_W=True, HAS_B=True, BLOCK_G=block_g, BLOCK_N=block_n), dict(num_warps=4))


def cases(quick: bool, arch: int, head_dims: list[int] | None) -> list[tuple]:
    """Every kernel to compile; only attention at `head_dims` when they are given."""
    if head_dims:
        return list(attention_cases(quick, arch, head_dims))
    return [*attention_cases(quick, arch, None), *layernorm_cases(quick, arch)]


def _compile_case(quick: bool, arch: int, head_dims: list[int] | None, index: int) -> dict:
    """Worker: compile case `index` for `arch` (cases are rebuilt here: kernels don't pickle)."""
    _label, fn, pointers, ints, floats, constexprs, launch = cases(quick, arch, head_dims)[index]
    return compile_kernel(fn, pointers, ints, floats, constexprs, launch, arch)


def read_baseline(path: str) -> dict[tuple[str, str], int]:
    """SASS instruction counts by (target, kernel) from an earlier report of this script; a
    report without a target column holds the one target its title names."""
    lines = Path(path).read_text().splitlines()
    table = [[c.strip() for c in line.strip().strip("|").split("|")]
             for line in lines if line.startswith("|") and not line.startswith("|---")]
    if not table or "SASS instructions" not in table[0]:
        raise SystemExit(f"{path}: no table with a 'SASS instructions' column")
    header, rows = table[0], table[1:]
    title = re.search(r"sm_(\d+)", lines[0])
    counts = {}
    for row in rows:
        cell = dict(zip(header, row))
        target = cell.get("target") or f"sm_{title.group(1)}"
        counts[(target, cell["kernel, specialization"])] = int(cell["SASS instructions"])
    return counts


def _ratio(count: int, without: int | None) -> str:
    return f"{count / without:.2f}x" if without else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        choices=sorted(gpu.SHARED_MEMORY),
                        help="compute capabilities x10 (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="the model's kernels only: bf16, causal, D 64 and 128; "
                             "add+LayerNorm at N=384 and in column tiles")
    parser.add_argument("--head-dims", type=int, nargs="+", metavar="D",
                        help="attention only, at these head dims (default: "
                             f"{' '.join(map(str, HEAD_DIMS))}, or 64 128 with --quick)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="kernels compiled in parallel (default: one per core)")
    add_out_argument(parser)
    parser.add_argument("--baseline", help="an earlier report: its instruction counts go beside")
    args = parser.parse_args()
    baseline = read_baseline(args.baseline) if args.baseline else {}
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    work = [(arch, i, case) for arch in args.arch
            for i, case in enumerate(cases(args.quick, arch, args.head_dims))]
    with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_case, args.quick, arch, args.head_dims, i)
                   for arch, i, _ in work]
        results = [f.result() for f in futures]

    by_label = {(arch, case[0]): usage for (arch, _, case), usage in zip(work, results)}
    rows = Rows(["target", "kernel, specialization", "launch", "registers", "spilled bytes",
                 "spill ld/st", "in loops", "shared bytes / limit", "fits", "SASS instructions",
                 "vs no dropout"] + (["baseline SASS", "baseline vs no dropout"] if baseline
                                     else []))
    problems, overflow = [], False
    for (arch, _, case), usage in zip(work, results):
        label, launch, target = case[0], case[-1], f"sm_{arch}"
        limit = gpu.SHARED_MEMORY[arch]
        fits = usage["shared"] <= limit
        overflow |= not fits
        plain = label.replace(" dropout", "")
        dropout = plain != label
        without = by_label.get((arch, plain)) if dropout else None
        row = [target, label, " ".join(f"{k}={v}" for k, v in launch.items()),
               usage["registers"], usage["spill"], usage["spill_ops"],
               usage["spill_ops_in_loops"], f"{usage['shared']} / {limit}",
               "yes" if fits else "NO", usage["instructions"],
               _ratio(usage["instructions"], without and without["instructions"])]
        if baseline:
            before = baseline.get((target, label))
            row += [before or "", _ratio(before, dropout and baseline.get((target, plain)))]
        rows.append(row)
        if usage["spill"]:
            in_loops, ops = usage["spill_ops_in_loops"], usage["spill_ops"]
            problems.append(f"{target} {label} ({usage['spill']} B, {in_loops} of {ops} ld/st "
                            "in loops)")
        elif not fits:
            problems.append(f"{target} {label}")
    archs = "-".join(str(a) for a in args.arch)
    write_report(
        args.out, f"compile-sm{archs}", f"Triton kernels compiled for sm_{archs} (no GPU)",
        rows.headers, rows, environment(),
        notes=f"{len(rows)} kernels; with spills or over the shared-memory limit: "
              f"{', '.join(problems) or 'none'}. Spill ld/st: the local-memory loads and stores "
              "(LDL, STL) in the cubin; in loops: those between a backward branch and its "
              "target, run once per iteration rather than once per program. SASS instructions: "
              "static count in the cubin (cuobjdump -sass, NOPs excluded); 'vs no dropout' "
              "divides a dropout kernel's count by the same kernel's without dropout."
              + (f" Baseline: {args.baseline}." if baseline else ""))
    if overflow:
        raise SystemExit("some kernels do not fit their target's shared memory")


if __name__ == "__main__":
    main()
