"""Shared pieces of the benchmark scripts: the environment block and the markdown report."""

from __future__ import annotations

import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()


# Dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s: the denominator of MFU.
# First match wins, so the more specific names come first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
]


def peak_tflops() -> float | None:
    """The current CUDA device's bf16 peak, or None when unknown (and always on the CPU)."""
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


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
    p = Path(path).resolve()
    return f"{p.parent.name}.{p.stem}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out_dir: str, name: str, title: str, headers: list[str], rows: list[list[str]],
                 env: dict[str, str], notes: str = "") -> Path:
    """Print the table and write it, with the environment, to OUT_DIR/NAME-DEVICE-DATE.md."""
    table = markdown_table(headers, rows)
    print(table)
    device_tag = "cuda" if torch.cuda.is_available() else "cpu"
    day = env["date"][:10]
    path = Path(out_dir) / f"{name}-{device_tag}-{day}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    env_lines = "\n".join(f"- {k}: `{v}`" for k, v in env.items())
    path.write_text(f"# {title}\n\n{env_lines}\n\n{table}\n" + (f"\n{notes}\n" if notes else ""))
    print(f"wrote {path}")
    return path


def synchronized(step, grad_to_none=None):
    """step() followed by a CUDA sync and gradients reset: one timed call for pytest-benchmark."""
    def run():
        step()
        for t in grad_to_none or ():
            t.grad = None
        if CUDA:
            torch.cuda.synchronize()

    return run


def median_ms(fn, grad_to_none=None) -> float:
    """Median wall time of fn() in milliseconds: triton's do_bench on CUDA (L2 flushed between
    runs, gradients reset), a warmed-up perf_counter loop of at least 0.3 s elsewhere."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                       return_mode="median")
    for _ in range(2):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < 0.3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        for t in grad_to_none or ():
            t.grad = None
    return 1000 * statistics.median(times)


def copy_bandwidth_gbs(n_bytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth (read + write) in GB/s, the ceiling for memory-bound ops."""
    device = "cuda" if CUDA else "cpu"
    n_bytes = n_bytes if CUDA else n_bytes // 8
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * n_bytes / ms / 1e6


def plot(path: Path, title: str, x_label: str, y_label: str, series: dict[str, list[tuple]]):
    """A PNG line plot, one line per provider; skipped (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no plot {path.name}")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        xs, ys = zip(*points)
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
