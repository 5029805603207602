"""`tinygpt bench`: run the benchmark scripts of a source checkout and gather one dated report.

The scripts live in the repository's `benchmarks/` folder (they are not installed with the
package), so this command needs the checkout that an editable install (`pip install -e .`) uses,
and the `bench` extra: pytest (the scripts hold pytest entries too) and matplotlib (plots).
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path

from .errors import UserError
from .signals import StopRequest

DEFAULT_OUT = "bench-results"
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


def run_benchmarks(suites: list[str], out_dir: str, quick: bool = False) -> tuple[Path, bool]:
    """Run the chosen suites, then gather what they wrote into OUT_DIR/report-DEVICE-DATE.md.
    Returns the report and whether a signal cut the run short: the script it reached writes what
    it measured (Ctrl-C reaches it too), the rest do not start; a second signal exits at once."""
    root = repository_root()
    if importlib.util.find_spec("pytest") is None:
        raise UserError('tinygpt bench needs pytest (its scripts hold pytest entries too): '
                        'pip install -e ".[bench]" in the checkout')
    if importlib.util.find_spec("matplotlib") is None:
        print('matplotlib is not installed: the report will have no plots '
              '(pip install -e ".[bench]" in the checkout)', flush=True)
    out = Path(out_dir).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory {out} ({e.strerror or e})") from e
    started = time.time()
    failures, interrupted = [], False
    # While a script runs, a signal is its to answer (Ctrl-C reaches it too); here it only ends
    # the run after that script.
    with StopRequest(speak=False) as stop:
        for script in (s for suite in suites for s in SUITES[suite]):
            print(f"== {script}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call([sys.executable, "-m", f"benchmarks.{script}", "--out", str(out),
                                  *(["--quick"] if quick else [])], cwd=root)
            print(f"== {script}: {'exit ' + str(rc) if rc else 'done'} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            interrupted = stop.signum is not None or rc == 128 + signal.SIGINT
            if rc and not interrupted:
                failures.append(f"{script} (exit {rc})")
            if interrupted:
                break
    written = sorted(p for p in out.glob("*.json") if p.stat().st_mtime >= started)
    if not written:
        if interrupted:
            raise KeyboardInterrupt
        raise UserError("no benchmark wrote a result; see the output above")
    heading = (f"suites: {', '.join(suites)}" + (" (--quick: small shapes, a check that every "
               "provider runs, not a speed)" if quick else ""))
    report = _gather(root, written, out, heading, failures)
    print(f"wrote {report}")
    if failures:
        raise UserError(f"benchmarks failed: {', '.join(failures)} (report: {report})")
    return report, interrupted


def _gather(root: Path, results: list[Path], out: Path, heading: str,
            failures: list[str]) -> Path:
    """`benchmarks.report` of the checkout gathers `results` into one report in `out`; it runs
    as a script, as the benchmarks do, so that this package never imports the benchmarks."""
    command = [sys.executable, "-m", "benchmarks.report", str(out), heading,
               "--results", *map(str, results), *(["--failed", *failures] if failures else [])]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"gathering the benchmark report failed ({last})")
    return Path(done.stdout.strip().splitlines()[-1].removeprefix("wrote "))
