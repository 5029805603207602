"""The kernels the model launches compile for sm_90 (H100, H200) without spilling registers.

Checked without a GPU: Triton compiles ahead of time with the ptxas it ships, and the resource
table comes from the cubin (benchmarks/compile_check.py). The interpreter, which the rest of the
suite uses on the CPU, must be off in the child process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.is_file(), reason="this Triton build ships no ptxas")
def test_model_kernels_compile_for_hopper_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (report,) = tmp_path.glob("compile-sm90-*.md")
    rows = [line.split(" | ") for line in report.read_text().splitlines()
            if line.startswith("| attention") or line.startswith("| layernorm")]
    assert len(rows) == 16  # 12 attention kernels (fwd, dK/dV, dQ) and 4 LayerNorm kernels
    for kernel, _launch, registers, spilled, _shared, fits in rows:
        assert int(spilled) == 0 and fits.rstrip(" |") == "yes", kernel
        assert 0 < int(registers) <= 255, kernel
