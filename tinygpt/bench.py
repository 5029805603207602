"""`tinygpt bench`: run the benchmark scripts of a source checkout and gather one dated report.

The scripts live in the repository's `benchmarks/` folder (they are not installed with the
package), so this command needs the checkout that an editable install (`pip install -e .`) uses.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from pathlib import Path

import torch

from .errors import UserError

SUITES = {
    "kernels": ["bench_layernorm", "bench_attention"],
    "train": ["bench_train"],
    "generate": ["bench_generate"],
}


def repository_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "bench_train.py").is_file():
        raise UserError("tinygpt bench runs the scripts in a source checkout's benchmarks/ "
                        "folder; install tinygpt with `pip install -e .` from a clone")
    return root


def run_benchmarks(suites: list[str], out_dir: str) -> Path:
    """Run the chosen suites, then write OUT_DIR/report-DEVICE-DATE.md linking every table."""
    root = repository_root()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    failures = []
    for suite in suites:
        for script in SUITES[suite]:
            print(f"== {script}", flush=True)
            rc = subprocess.call([sys.executable, "-m", f"benchmarks.{script}", "--out", str(out)],
                                 cwd=root)
            if rc:
                failures.append(f"{script} (exit {rc})")
    written = sorted(p for p in out.glob("*.md")
                     if p.stat().st_mtime >= started and not p.name.startswith("report-"))
    if not written:
        raise UserError("no benchmark wrote a result; see the output above")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as the scripts name their files
    day = datetime.date.today().isoformat()
    report = out / f"report-{device}-{day}.md"
    parts = [f"# tinygpt benchmark report ({device}, {day})\n",
             f"Suites: {', '.join(suites)}."
             + (f" Failed: {', '.join(failures)}." if failures else "")]
    for path in written:
        body = path.read_text().split("\n", 1)[1]  # drop the file's own title line
        plot = path.with_suffix(".png")
        image = f"\n![{plot.stem}]({plot.name})\n" if plot.exists() else ""
        parts.append(f"## {path.stem}\n{body}{image}")
    report.write_text("\n\n".join(parts))
    print(f"wrote {report}")
    if failures:
        raise UserError(f"benchmarks failed: {', '.join(failures)} (report: {report})")
    return report
