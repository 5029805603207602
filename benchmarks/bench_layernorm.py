"""LayerNorm benchmark: the fused Triton kernels vs PyTorch, eager and torch.compile'd.

    python -m benchmarks.bench_layernorm [--dtype bfloat16] [--cases model bandwidth sweep]
        [--quick] [--out DIR]                                        # tables + plot
    python -m pytest benchmarks/bench_layernorm.py --benchmark-enable      # pytest-benchmark

(On the CPU the pytest entries leave out the compiled competitors, which take longer to compile
than the rest of the entries take to run; the tables include them.)

Two cases. "layernorm": LayerNorm alone. "add+layernorm": what a pre-norm block runs under bf16
autocast, h = x + residual (x the bf16 branch output, the residual stream fp32) then
LayerNorm(h) handed to the next Linear in bf16; the competitors run the same three steps unfused
(`x + r`, LayerNorm, `.to(bf16)`, the cast the Linear would do); its backward takes the gradient
of h from later layers too. Providers: triton; PyTorch eager (`F.layer_norm`); the same compiled
by `torch.compile` once per shape and mode (`dynamic=False`, Dynamo reset first, so never a
dynamic-shape kernel or a fallback past the recompile limit); Liger-Kernel's LayerNorm when
`liger_kernel` imports. The model's shape is timed with fp32 input (what autocast hands
LayerNorm alone) and in the sweep's dtype.

Times are back-to-back (no cache flush, as in training) and flushed (do_bench), as in
bench_attention; GB/s and ratios use back-to-back.

GB/s counts the bytes each case must move at least (every input read and every output written
once: LayerNorm 2 elements forward, 3 backward; add+LayerNorm x, r, h, y forward and dy, h, dh,
dx, dr backward), for every provider alike, set against the copy bandwidth measured in the same
run. Goals (issue 13), judged in the last column on CUDA:
  - at the model's shape, add+LayerNorm fwd+bwd >= 2x unfused eager and >= 1x unfused compiled;
  - >= 85% of copy bandwidth at 16k rows x 4096;
  - never slower than F.layer_norm (LayerNorm) or the unfused eager steps, at any width.
Without CUDA it says so and times only the torch providers, on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tinygpt.kernels import add_layer_norm, layer_norm

from benchmarks.report import (
    CUDA,
    Interruptible,
    Rows,
    Timing,
    add_out_argument,
    assert_finite,
    copy_bandwidth_gbs,
    environment,
    plot,
    ratio,
    release_memory,
    skip_reason,
    synchronized,
    time_ms,
    write_report,
)

DEVICE = "cuda" if CUDA else "cpu"
MODEL_SHAPE = (64 * 256, 384)  # batch 64 x block 256 rows of the shakespeare-char width
BANDWIDTH_SHAPE = (16384, 4096)
SWEEP = [(65536, 128), (65536, 256), (65536, 512), (65536, 1024), (32768, 2048), BANDWIDTH_SHAPE,
         (8192, 8192), (4096, 16384), (1024, 65536)]
ADD_SWEEP = [(16384, 1024), BANDWIDTH_SHAPE, (4096, 16384), (1024, 65536)]
CPU_SHAPES = [(4096, 128), (2048, 384), (1024, 1024)]
QUICK_SHAPES = [(256, 384)]
BRANCH, STREAM = torch.bfloat16, torch.float32  # dtypes of x and the residual under autocast
EPS = 1e-5
COMPILE_BACKEND = "inductor"  # torch.compile's backend for the compiled provider


def _torch_ln(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, EPS)


def _torch_add_ln(x, r, w, b):
    h = x + r
    return F.layer_norm(h, h.shape[-1:], w, b, EPS).to(BRANCH), h


def _triton_add_ln(x, r, w, b):
    return add_layer_norm(x, r, w, b, EPS, out_dtype=BRANCH)


def _liger(case: str) -> Callable:
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    if case == "layernorm":
        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)

    def add_ln(x, r, w, b):
        h = x + r
        return LigerLayerNormFunction.apply(h, w, b, EPS).to(BRANCH), h

    return add_ln


def _liger_missing() -> str | None:
    if not CUDA:
        return "Triton kernels: CUDA only"
    try:
        import liger_kernel.ops.layer_norm  # noqa: F401
    except ImportError as e:
        return f"liger-kernel does not import ({e}); `pip install liger-kernel` to compare"
    return None


def _compiled(case: str) -> Callable:
    torch._dynamo.reset()  # a fresh static-shape compile, never a reused dynamic one
    eager = {"layernorm": _torch_ln, "add+layernorm": _torch_add_ln}[case]
    return torch.compile(eager, dynamic=False, backend=COMPILE_BACKEND)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[str], Callable]  # case -> fn, built fresh for every shape and mode
    missing: str | None = None  # why it cannot run on this device at all


def providers() -> list[Provider]:
    """Every provider this benchmark knows, each with the reason it cannot run here, if any."""
    fused = {"layernorm": layer_norm, "add+layernorm": _triton_add_ln}
    eager = {"layernorm": _torch_ln, "add+layernorm": _torch_add_ln}
    return [
        Provider("triton", fused.__getitem__,
                 None if CUDA else "no CUDA: Triton runs here only in its interpreter, which is "
                                   "not a speed"),
        Provider("torch", eager.__getitem__),
        Provider("torch.compile", _compiled),
        Provider("liger", _liger, _liger_missing()),
    ]


def make_case(case: str, M: int, N: int, dtype: torch.dtype, mode: str, fn):
    """(step, tensors whose .grad to reset) for one provider, on seeded random inputs."""
    torch.manual_seed(0)
    grad = mode != "fwd"
    x_dtype, r_dtype = (dtype, dtype) if case == "layernorm" else (BRANCH, STREAM)
    x = torch.randn(M, N, device=DEVICE, dtype=x_dtype, requires_grad=grad)
    w = torch.randn(N, device=DEVICE, dtype=r_dtype, requires_grad=grad)
    b = torch.randn(N, device=DEVICE, dtype=r_dtype, requires_grad=grad)
    if case == "layernorm":
        inputs, grads_out = (x, w, b), [torch.randn_like(x)]
    else:
        r = torch.randn(M, N, device=DEVICE, dtype=r_dtype, requires_grad=grad)
        inputs = (x, r, w, b)
        grads_out = [torch.randn(M, N, device=DEVICE, dtype=BRANCH), torch.randn_like(r)]
    if mode == "fwd":
        return (lambda: fn(*inputs)), None

    def step():
        out = fn(*inputs)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads_out)
        return out

    return step, list(inputs)


def bytes_moved(case: str, M: int, N: int, dtype: torch.dtype, mode: str) -> int:
    if case == "layernorm":
        sizes = {"fwd": [dtype] * 2, "fwd+bwd": [dtype] * 5}[mode]
    else:  # forward x, r, h, y; backward dy, h, dh, dx, dr
        fwd = [BRANCH, STREAM, STREAM, BRANCH]
        sizes = fwd if mode == "fwd" else fwd + [BRANCH, STREAM, STREAM, BRANCH, STREAM]
    return M * N * sum(s.itemsize for s in sizes)


def goal(case: str, shape: tuple, mode: str, ms: dict[str, float], fraction_of_copy: float
         ) -> str:
    """The issue-13 goals this triton row is held to, met or missed (back-to-back times)."""
    checks = []
    if case == "add+layernorm" and shape == MODEL_SHAPE and mode == "fwd+bwd":
        checks += [("2x unfused eager", "torch", 2.0), ("1x unfused compiled", "torch.compile",
                                                         1.0)]
    elif case == "add+layernorm":
        checks.append(("not slower than unfused eager", "torch", 1.0))
    else:
        checks.append(("not slower than F.layer_norm", "torch", 1.0))
    verdicts = []
    for name, competitor, need in checks:
        if competitor not in ms:
            verdicts.append(f"{name}: not judged ({competitor} did not run)")
        else:
            met = ms[competitor] / ms["triton"] >= need
            verdicts.append(f"{name}: {'met' if met else 'MISSED'}")
    if shape == BANDWIDTH_SHAPE:
        verdicts.append(f"85% of copy BW: {'met' if fraction_of_copy >= 0.85 else 'MISSED'}")
    return "; ".join(verdicts)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", providers(), ids=lambda p: p.name)
@pytest.mark.parametrize("case", ["layernorm", "add+layernorm"])
def test_layer_norm(benchmark, case, provider, mode):
    if provider.missing is not None:
        pytest.skip(provider.missing)
    if provider.make is _compiled and not CUDA:
        pytest.skip("torch.compile is timed on CUDA only")
    M, N = MODEL_SHAPE if CUDA else CPU_SHAPES[1]
    dtype = torch.float32  # what autocast hands LayerNorm: the fp32 residual stream
    step, grads = make_case(case, M, N, dtype, mode, provider.make(case))
    benchmark.extra_info.update(case=case, shape=(M, N), dtype=str(dtype), device=DEVICE)
    run = synchronized(step, grads)
    run()  # compile (Triton JIT, torch.compile) outside the timed rounds
    assert_finite(benchmark(run), (M, N))


def run_case(provider: Provider, case: str, M: int, N: int, dtype, mode: str) -> Timing | str:
    """One provider's timing of one case, or the reason it could not run."""
    try:
        step, grads = make_case(case, M, N, dtype, mode, provider.make(case))
        return time_ms(step, grads)
    except Exception as e:  # out of memory, say: a row, not a crash
        return skip_reason(e)
    finally:
        release_memory()


def measure(case: str, shapes: list, dtype: torch.dtype, ceiling: float, found: list[Provider],
            rows: Rows, series: dict) -> None:
    dtype_name = str(dtype).removeprefix("torch.") if case == "layernorm" else "bf16 + fp32"
    for M, N in shapes:
        for mode in ("fwd", "fwd+bwd"):
            results = {p.name: run_case(p, case, M, N, dtype, mode) for p in found}
            timed = {n: t for n, t in results.items() if isinstance(t, Timing)}
            best_other = min((t for n, t in timed.items() if n != "triton"), default=None,
                             key=lambda t: t.back_to_back)
            for name, result in results.items():
                row = [case, f"{M}x{N}", dtype_name, mode, name]
                if isinstance(result, str):
                    rows.append(row + ["-"] * 6 + ["", f"skipped: {result}"])
                else:
                    gbs = bytes_moved(case, M, N, dtype, mode) / result.back_to_back / 1e6
                    judged = name == "triton" and CUDA
                    rows.append(row + [
                        "n/a" if result.flushed is None else f"{result.flushed:.4f}",
                        f"{result.back_to_back:.4f}", f"{gbs:,.0f}",
                        f"{100 * gbs / ceiling:.0f}%", ratio(timed.get("torch"), result),
                        ratio(best_other, result),
                        goal(case, (M, N), mode, {n: t.back_to_back for n, t in timed.items()},
                             gbs / ceiling) if judged else "", ""])
                    if (M, N) != MODEL_SHAPE:
                        series.setdefault(f"{case} {name} {mode}", []).append((N, gbs))


CASE_GROUPS = ("model", "bandwidth", "sweep")


def cases(groups, dtype: torch.dtype) -> list[tuple[str, list[tuple[int, int]], torch.dtype]]:
    """(case, shapes, dtype) to measure on CUDA for `groups`, in the order given: model (the
    model's shape: add+LayerNorm, LayerNorm in fp32 and in `dtype`), bandwidth (16k rows x 4096,
    the copy-bandwidth goal's), sweep (every other width)."""
    model = [("add+layernorm", [MODEL_SHAPE], dtype)]
    model += [("layernorm", [MODEL_SHAPE], d) for d in dict.fromkeys([torch.float32, dtype])]
    found = {
        "model": model,
        "bandwidth": [("add+layernorm", [BANDWIDTH_SHAPE], dtype),
                      ("layernorm", [BANDWIDTH_SHAPE], dtype)],
        "sweep": [("add+layernorm", [s for s in ADD_SWEEP if s != BANDWIDTH_SHAPE], dtype),
                  ("layernorm", [s for s in SWEEP if s != BANDWIDTH_SHAPE], dtype)],
    }
    return [case for group in dict.fromkeys(groups) for case in found[group]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16" if CUDA else "float32",
                        choices=["bfloat16", "float16", "float32"],
                        help="dtype of the LayerNorm-alone sweep (its model-shape row is "
                             "always fp32 too, what autocast feeds LayerNorm)")
    parser.add_argument("--quick", action="store_true",
                        help="one small shape: checks that every provider runs, not a speed")
    parser.add_argument("--cases", nargs="+", choices=CASE_GROUPS, default=list(CASE_GROUPS),
                        help="which cases on CUDA, in this order (default: all): model, "
                             "bandwidth (16k rows x 4096), sweep (the other widths)")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if not CUDA:
        print("No CUDA device: the Triton kernels run here only in their interpreter, which is "
              "not a speed; timing the other providers on the CPU.")
    every = providers()
    found = [p for p in every if p.missing is None]
    ceiling = copy_bandwidth_gbs()
    print(f"measured copy bandwidth: {ceiling:,.0f} GB/s")
    rows = Rows(["case", "shape (rows x N)", "dtype", "mode", "provider", "ms flushed",
                 "ms back-to-back", "GB/s", "of copy BW", "vs torch eager", "vs best competitor",
                 "goal", "note"])
    series = {}
    with Interruptible() as run:
        if args.quick:
            measure("add+layernorm", QUICK_SHAPES, dtype, ceiling, found, rows, series)
            measure("layernorm", QUICK_SHAPES, dtype, ceiling, found, rows, series)
        elif CUDA:
            for case, shapes, case_dtype in cases(args.cases, dtype):
                measure(case, shapes, case_dtype, ceiling, found, rows, series)
        else:
            measure("add+layernorm", CPU_SHAPES, dtype, ceiling, found, rows, series)
            measure("layernorm", CPU_SHAPES, dtype, ceiling, found, rows, series)
    path = write_report(
        args.out, "layernorm", f"LayerNorm and add+LayerNorm: Triton vs PyTorch (eager, "
                               f"compiled) and Liger ({DEVICE})",
        rows.headers, rows, environment(),
        notes=f"Copy bandwidth measured in this run: {ceiling:,.0f} GB/s (read + write). "
              "add+layernorm: x bf16, residual fp32, output bf16; the competitors run "
              "`x + r`, LayerNorm and `.to(bf16)` unfused. Ratios: the other time over the "
              "row's (above 1: the row is faster), back-to-back, L2-flushed in brackets; GB/s "
              "from the back-to-back time.",
        providers={p.name: p.missing for p in every}, interrupted=run.interrupted,
    )
    plot(path.with_suffix(".png"), "LayerNorm and add+LayerNorm throughput", "N (features)",
         "GB/s (back-to-back)", series)
    run.exit_if_interrupted()


if __name__ == "__main__":
    main()
