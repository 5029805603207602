"""Shared pieces of the benchmark scripts: the environment block, the two timings (back-to-back
as in training, and L2-flushed), skipped cells, the markdown/JSON results and the gathered
report."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from tinygpt.bench import DEFAULT_OUT
from tinygpt.devices import cpu_bf16_units, cpu_words

CUDA = torch.cuda.is_available()
DEVICE_TAG = "cuda" if CUDA else "cpu"  # in every result's file name


# Dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s: the denominator of MFU.
# First match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
]
INTERRUPTED = "Interrupted before the end of the run: this table is partial."
# The corpus beside a checkout (../shared), which the training benchmarks use when it is there.
SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def add_out_argument(parser) -> None:
    """--out: where a script writes its results; outside the tracked results unless asked."""
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"where the results go (default: {DEFAULT_OUT}; pass --out "
                             "benchmarks/results for results to commit)")


class Interruptible:
    """`with Interruptible() as run:` around a script's measuring. Ctrl-C, or the SIGINT that
    gpu_suite.sh sends at its deadline, ends the block instead of the script, so that what was
    measured is still written (`write_report(..., interrupted=run.interrupted)`); then
    `run.exit_if_interrupted()` ends the script with status 130."""

    interrupted = False

    def __enter__(self) -> Interruptible:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not KeyboardInterrupt:
            return False
        self.interrupted = True
        print("\ninterrupted: writing what was measured so far", flush=True)
        return True

    def exit_if_interrupted(self) -> None:
        if self.interrupted:
            raise SystemExit(130)


def peak_tflops() -> float | None:
    """The current CUDA device's bf16 peak, or None when unknown (and always on the CPU)."""
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# A CPU with AVX2 and nothing wider, as on many laptops: oneDNN's kernels (bf16 products among
# them), MKL's (fp32 products) and torch's own each kept to AVX2 by their variable.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"}
AVX2_ONLY_WORDS = ", ".join(f"{k}={v}" for k, v in AVX2_ONLY.items())


def simulates_another_cpu() -> bool:
    """Whether `AVX2_ONLY` makes this CPU look like another: it has AVX-512 or bf16 units."""
    return (torch.backends.cpu.get_cpu_capability() != "AVX2"
            or cpu_bf16_units({})[0] is not None)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU: {cpu_words()}, {torch.get_num_threads()} threads"


def environment() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "command": "python " + shlex.join(sys.argv if not sys.argv[0].endswith(".py")
                                          else ["-m", _module_name(sys.argv[0])] + sys.argv[1:]),
    }


def _module_name(path: str) -> str:
    """The name `python -m` ran the script at `path` by: its packages (folders with an
    __init__.py) and its stem."""
    p = Path(path).resolve()
    parts = [p.stem]
    while (p.parent / "__init__.py").is_file():
        p = p.parent
        parts.insert(0, p.name)
    return ".".join(parts)


def table_line(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join([table_line(headers), "|" + "---|" * len(headers), *map(table_line, rows)])


class Rows(list):
    """A report's rows, shown as one markdown table while they are measured: the header with
    the first row, then each row as it is appended (`write_report` does not print it again)."""

    def __init__(self, headers: list[str]):
        super().__init__()
        self.headers = headers

    def append(self, row: list) -> None:
        if not self:
            print(markdown_table(self.headers, []))
        super().append(row)
        print(table_line(row), flush=True)


def write_report(out_dir: str, name: str, title: str, headers: list[str], rows: list[list[str]],
                 env: dict[str, str], notes: str = "",
                 providers: dict[str, str | None] | None = None,
                 interrupted: bool = False, data: dict | None = None) -> Path:
    """Print the table (unless its `Rows` showed it already) and write it, with the environment
    and what was compared, to OUT_DIR/NAME-DEVICE-DATE.md, plus the same content as .json for
    `tinygpt bench` to gather.

    providers: name -> None when it ran here, or the reason it could not. interrupted: the run
    stopped early (Interruptible), which the notes then say first. data: the raw measurements
    the table was made from, kept in the .json only."""
    if interrupted:
        notes = f"**{INTERRUPTED}**" + (f"\n\n{notes}" if notes else "")
    table = markdown_table(headers, rows)
    if not isinstance(rows, Rows):
        print(table)
    path = Path(out_dir) / f"{name}-{DEVICE_TAG}-{env['date'][:10]}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    env_lines = "\n".join(f"- {k}: `{v}`" for k, v in env.items())
    compared = "\nCompared:\n" + "\n".join(compared_lines(providers)) + "\n" if providers else ""
    path.write_text(f"# {title}\n\n{env_lines}\n{compared}\n{table}\n"
                    + (f"\n{notes}\n" if notes else ""))
    path.with_suffix(".json").write_text(json.dumps(
        dict(title=title, env=env, providers=providers or {}, headers=headers,
             rows=[[str(c) for c in row] for row in rows], notes=notes, interrupted=interrupted,
             **({"data": data} if data is not None else {})),
        indent=1))
    print(f"wrote {path}")
    return path


def compared_lines(providers: dict[str, str | None]) -> list[str]:
    """One line per provider: timed, or why it was not."""
    return [f"- {n}: " + ("timed" if why is None else f"not timed here: {why}")
            for n, why in providers.items()]


def skip_reason(error: BaseException) -> str:
    """One line saying why a provider could not run a case (out of memory, unsupported, ...)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory" + (f" ({text[:100]})" if text else "")
    return f"{type(error).__name__}: {text[:120]}"


def release_memory() -> None:
    """Return cached blocks after a case, so that one provider's leftovers do not starve the
    next (or make an out-of-memory error stick)."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def synchronized(step, grad_to_none=None):
    """step() followed by a CUDA sync and gradients reset: one timed call for pytest-benchmark,
    which hands back what step returned."""
    def run():
        out = step()
        for t in grad_to_none or ():
            t.grad = None
        if CUDA:
            torch.cuda.synchronize()
        return out

    return run


def assert_finite(out, shape) -> None:
    """A pytest-benchmark entry's check of what it timed: every output tensor of `shape`, finite."""
    for t in out if isinstance(out, tuple) else (out,):
        assert tuple(t.shape) == tuple(shape) and torch.isfinite(t).all(), t


@dataclasses.dataclass
class Timing:
    """Milliseconds per call two ways. back_to_back: calls issued one after another with no
    cache flush, timed around the whole run (CUDA events on a GPU): what a training loop sees,
    launch overhead included. flushed: triton's do_bench median, L2 cleared before each call
    (kernel time alone); None on the CPU, which has no such mode."""

    back_to_back: float
    flushed: float | None = None


def time_ms(fn, grad_to_none=None) -> Timing:
    """Both timings of fn(), warmed up first (JIT compilation and autotuning excluded)."""
    return Timing(back_to_back_ms(fn, grad_to_none), flushed_ms(fn, grad_to_none))


def flushed_ms(fn, grad_to_none=None) -> float | None:
    """triton's do_bench median, L2 cleared before each call; None without CUDA."""
    if not CUDA:
        return None
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                   return_mode="median")


def back_to_back_ms(fn, grad_to_none=None, budget_ms: float = 300.0, repeats: int = 5,
                    calls: int | None = None, warmup: int = 2) -> float:
    """Median over `repeats` runs of the mean time per call of N back-to-back calls of fn(), N
    given by `calls` or chosen so that all runs take about budget_ms. Gradients are reset
    between calls (as `zero_grad(set_to_none=True)` does in training), inside the timed loop."""
    def call():
        fn()
        for t in grad_to_none or ():
            t.grad = None

    def elapsed_ms(n: int) -> float:
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        return 1000 * (time.perf_counter() - t0)

    for _ in range(warmup):
        call()
    if CUDA:
        torch.cuda.synchronize()
    n = calls or max(1, int(budget_ms / repeats / max(elapsed_ms(1), 1e-3)))
    return statistics.median(elapsed_ms(n) / n for _ in range(repeats))


def peak_mib(step, grad_to_none=None) -> float | None:
    """Memory one call of step() allocates beyond what is live before it (inputs, parameters),
    with gradients from earlier calls freed first; None on the CPU."""
    if not CUDA:
        return None
    for t in grad_to_none or ():
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in grad_to_none or ():
        t.grad = None
    return peak / 2**20


def ratio(best: Timing | None, row: Timing) -> str:
    """best / row, back-to-back, with the flushed ratio beside it where both have one."""
    if best is None:
        return ""
    text = f"{best.back_to_back / row.back_to_back:.2f}x"
    if best.flushed is not None and row.flushed is not None:
        text += f" (flushed {best.flushed / row.flushed:.2f}x)"
    return text


def copy_bandwidth_gbs(n_bytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth (read + write) in GB/s, the ceiling for memory-bound ops."""
    device = "cuda" if CUDA else "cpu"
    n_bytes = n_bytes if CUDA else n_bytes // 8
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = flushed_ms(lambda: dst.copy_(src)) or back_to_back_ms(lambda: dst.copy_(src))
    return 2 * n_bytes / ms / 1e6


def plot(path: Path, title: str, x_label: str, y_label: str, series: dict[str, list[tuple]]):
    """A PNG line plot, one line per provider; skipped (with a note) without matplotlib or
    without points."""
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no plot {path.name}")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def gather(results: list[Path], out_dir: Path, heading: str, failures: list[str]) -> Path:
    """One report, OUT_DIR/report-DEVICE-DATE.md (the first result's device and date, wherever
    it is gathered), from the .json results of one benchmark run:
    the environment, what each benchmark compared (and why anything was not timed), every goal
    with its verdict, then each table with its plot."""
    parts = [json.loads(p.read_text()) | {"stem": p.stem} for p in results]
    env = parts[0]["env"]
    device_tag = parts[0]["stem"].rsplit("-", 4)[1]  # NAME-DEVICE-YYYY-MM-DD: where it ran
    path = out_dir / f"report-{device_tag}-{env['date'][:10]}.md"
    lines = [f"# tinygpt benchmark report: {env['device']}, {env['date']}", "",
             *(f"- {k}: `{v}`" for k, v in env.items() if k not in ("date", "command")),
             *([f"- {heading}"] if heading else [])]
    if failures:
        lines.append(f"- **failed**: {', '.join(failures)} (their output is above the report "
                     "in the console; nothing of theirs is below)")
    partial = [p["stem"] for p in parts if p.get("interrupted")]
    if partial:
        lines.append(f"- **interrupted, partial**: {', '.join(partial)}")
    lines += ["", "## What was compared", ""]
    for part in (p for p in parts if p["providers"]):
        lines += [f"**{part['title']}**", *compared_lines(part["providers"])]
        skipped = sum(1 for row in part["rows"] if row[-1].startswith("skipped"))
        if skipped:
            lines.append(f"- {skipped} row(s) could not run; the note column says why")
        lines.append("")
    lines += ["## Goals", ""]
    goal_rows = []
    for part in parts:
        if "goal" not in part["headers"]:
            continue
        g = part["headers"].index("goal")
        key = next(i for i, h in enumerate(part["headers"]) if h.startswith("ms"))
        goal_rows += [[part["stem"], " / ".join(row[:key]), row[g]] for row in part["rows"]
                      if row[g]]
    if goal_rows:
        verdicts = " ".join(r[2] for r in goal_rows)
        lines += [f"{verdicts.count(': met')} met, {verdicts.count('MISSED')} missed, "
                  f"{verdicts.count('not judged')} not judged.", "",
                  markdown_table(["benchmark", "row", "goal"], goal_rows), ""]
    else:
        lines += ["No goal judged: the goals are CUDA speeds, and this run had no CUDA "
                  "device (or no goal row ran).", ""]
    for part in parts:
        lines += [f"## {part['stem']}: {part['title']}", "",
                  f"`{part['env']['command']}`", "",
                  markdown_table(part["headers"], part["rows"]), ""]
        if part["notes"]:
            lines += [part["notes"], ""]
        png = out_dir / f"{part['stem']}.png"
        if png.exists():
            lines += [f"![{part['stem']}]({png.name})", ""]
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    """python -m benchmarks.report DIR [HEADING] [--results FILE...] [--failed SCRIPT...]:
    gather the results (default: every .json in DIR) into one report in DIR."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("heading", nargs="?", default="")
    parser.add_argument("--results", nargs="+", type=Path, help="the results to gather")
    parser.add_argument("--failed", nargs="+", default=[], help="scripts that failed, and how")
    args = parser.parse_args(argv)
    found = args.results or sorted(args.folder.glob("*.json"))
    if not found:
        raise SystemExit(f"no benchmark results (.json) in {args.folder}")
    print(f"wrote {gather(found, args.folder, args.heading, args.failed)}")


if __name__ == "__main__":
    main()
