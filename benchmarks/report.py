"""Shared pieces of the benchmark scripts: the environment block and the markdown report."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from pathlib import Path

import torch


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
