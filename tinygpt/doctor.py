"""`tinygpt doctor`: this machine, whether the fused kernels are right on it, and whether they are
faster than torch at a model's training shape. The first thing to paste into a bug report.

Three parts, printed as they finish (`--json FILE` writes them too):
  environment  the device, driver and CUDA runtime, torch, Triton, Python, and what `--backend
               auto` would pick here and why;
  correctness  `verify.check_kernels` at the model's training shape and dtype and at two odd
               shapes (T and the LayerNorm width no multiple of any block, padded head dims):
               one line per op, pass or FAIL with its error as a multiple of PyTorch's own;
  speed        the model's training step, with the preset's optimizers, on the torch and triton
               backends (and compiled, with --compile), interleaved after a warm-up: median ms,
               tokens/s and the ratio (one step each in the interpreter).
Off CUDA the kernels run in Triton's CPU interpreter at small shapes: a smoke test of every path,
not a speed. The exit status is 1 when any op fails its check.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from tinygpt import __version__, kernels
from tinygpt.kernels.gpu import unsupported_reason

from . import ops, verify
from .config import ModelConfig, TrainConfig
from .errors import UserError, os_reason
from .memory import GIB, is_out_of_memory
from .model import attention_shape
from .trust import device_words

# Odd shapes (B, T, H, D): T no multiple of 16, head dims padded to 32 and 128, LayerNorm widths
# (H x D) below their power-of-two block. Smaller in the interpreter, where each program is slow.
ODD_SHAPES = {"cuda": [(2, 97, 3, 24), (1, 203, 2, 80)], "cpu": [(1, 37, 2, 24), (1, 23, 3, 40)]}
INTERPRETER_BATCH, INTERPRETER_BLOCK = 2, 64  # the training shape, cut for the interpreter
# (rounds, warm-up steps) of the speed part: each round times one step per backend. In the
# interpreter one step shows that the step runs, and more would not make it a speed.
SPEED_STEPS = {"cuda": (10, 3), "cpu": (1, 0)}


def _driver() -> str:
    """The NVIDIA driver's version (from nvidia-smi) and the CUDA runtime torch was built with."""
    driver = "driver unknown (no nvidia-smi)"
    if (smi := shutil.which("nvidia-smi")) is not None:
        try:
            found = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=10)
            versions = found.stdout.split()
            driver = f"driver {versions[0]}" if found.returncode == 0 and versions else driver
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{driver}, CUDA runtime {torch.version.cuda}"


def environment(device: torch.device, interpreted: bool) -> dict[str, str]:
    import numpy

    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"not usable ({e})"
    env = {"tinygpt": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton_version, "numpy": numpy.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        env["device"] = (f"{device}: {props.name}, compute capability {props.major}.{props.minor}, "
                         f"{props.multi_processor_count} SMs, {total / GIB:.1f} GiB "
                         f"({free / GIB:.1f} free)")
        env["driver"] = _driver()
    else:
        env["device"] = (f"{device}: {platform.machine()} CPU, {torch.get_num_threads()} threads"
                         + ("; the kernels run in Triton's interpreter, at small shapes"
                            if interpreted else ""))
    return env


def kernels_unusable(device: torch.device, model_cfg: ModelConfig, batch: int,
                     interpreted: bool) -> str | None:
    """Why the Triton kernels cannot run this model on `device`, or None when they can."""
    if model_cfg.model == "bigram":
        return "the bigram model runs no fused op"
    if kernels.TRITON_IMPORT_ERROR is not None:
        return f"Triton is not usable ({kernels.TRITON_IMPORT_ERROR})"
    if device.type == "cuda":
        if (reason := unsupported_reason(device)) is not None:
            return reason
    elif not interpreted:
        return "off CUDA the kernels run only in Triton's interpreter, and TRITON_INTERPRET is off"
    return kernels.unsupported_shape(*attention_shape(model_cfg, batch))


def auto_words(device: torch.device, unusable: str | None) -> str:
    """What `--backend auto` picks for a training run here, and why."""
    request, source = ops.requested_backend("auto")
    if request != "auto":
        return f"{request}: {source}={request} replaces auto"
    if device.type != "cuda":
        return "torch: the Triton kernels run on CUDA GPUs only"
    if unusable is not None:
        return f"torch: {unusable}"
    return ("triton where its kernels pass the check below at the run's shape and a training "
            "step times faster than torch's there (decided and cached by `tinygpt train`), "
            "else torch")


class Doctor:
    """One `tinygpt doctor` run; `run()` returns its exit status."""

    def __init__(self, device: torch.device, model_cfg: ModelConfig, cfg: TrainConfig,
                 compile: bool, interpreted: bool, write: Callable[[str], None]):
        self.device, self.model_cfg, self.cfg = device, model_cfg, cfg
        self.compile, self.interpreted, self.write = compile, interpreted, write
        self.kind = "cuda" if device.type == "cuda" else "cpu"
        self.amp_dtype = ops.precision(device)[0]
        self.report: dict = {}

    def run(self) -> int:
        unusable = kernels_unusable(self.device, self.model_cfg, self.cfg.batch_size,
                                    self.interpreted)
        self.section("environment")
        env = environment(self.device, self.interpreted)
        env["auto"] = auto_words(self.device, unusable)
        for name, value in env.items():
            self.write(f"  {name:9s} {value}")
        self.report["environment"] = env
        passed = True
        if unusable is None:
            passed = self.correctness()
        else:
            self.section("correctness")
            self.write(f"  not checked: {unusable}")
        self.report["passed"] = passed
        speedup = self.speed(unusable)
        self.section("verdict")
        if not passed:
            self.write("  FAILED: a fused op is wrong on this machine; `tinygpt train` runs the "
                       "torch backend here (and refuses --backend triton). Please report this "
                       "output.")
        elif unusable is None:
            self.write("  every fused op passed its check")
        if passed and unusable is None and self.device.type == "cuda":
            self.write(f"  `--backend auto` at this shape: {auto_verdict(speedup)}")
        return 0 if passed else 1

    def section(self, title: str) -> None:
        self.write(f"\n{title}")

    def training_shape(self) -> tuple[ModelConfig, int]:
        """The model and batch checked and timed: the run's, cut in the interpreter."""
        if not self.interpreted:
            return self.model_cfg, self.cfg.batch_size
        block = min(self.model_cfg.block_size, INTERPRETER_BLOCK)
        return (dataclasses.replace(self.model_cfg, block_size=block),
                min(self.cfg.batch_size, INTERPRETER_BATCH))

    def correctness(self) -> bool:
        model_cfg, batch = self.training_shape()
        dtype = self.amp_dtype or torch.float32
        shapes = [("the training shape", verify.Shape.of(model_cfg, batch, dtype).capped())]
        shapes += [("odd shape", verify.Shape(*odd, dtype, model_cfg.bias, model_cfg.dropout))
                   for odd in ODD_SHAPES[self.kind]]
        self.section("correctness (the largest error against the fp64 reference over the output "
                     "and every gradient, as a multiple of PyTorch's own in the same dtypes)")
        results, passed = [], True
        for role, shape in shapes:
            self.write(f"  {shape.describe()} ({role}):")
            try:
                checks = verify.check_kernels(shape, self.device, self.amp_dtype)
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                self.write("    not checked: out of memory at this shape")
                results.append({"shape": shape.describe(), "role": role, "checks": None})
                continue
            for check in checks:
                self.write(f"    {check.describe()}")
            passed &= all(c.passed for c in checks)
            results.append({"shape": shape.describe(), "role": role,
                            "checks": [_json_check(c) for c in checks]})
        self.report["correctness"] = results
        return passed

    def speed(self, unusable: str | None) -> float | None:
        """Times the steps and reports them; returns triton's eager speed-up over torch (None
        when triton was not timed)."""
        model_cfg, batch = self.training_shape()
        step_cfg = dataclasses.replace(self.cfg, batch_size=batch)
        rounds, warmup = SPEED_STEPS[self.kind]
        backends = ("torch",) if unusable else ("torch", "triton")
        tokens = batch * model_cfg.block_size
        autocast = (f", under {str(self.amp_dtype).removeprefix('torch.')} autocast"
                    if self.amp_dtype else "")
        optimizers = "Muon and AdamW" if self.cfg.optimizer == "muon" else "AdamW"
        steps = (f"median of {rounds} interleaved steps after {warmup} of warm-up" if rounds > 1
                 else "one step each")
        self.section(f"speed (a training step: forward, backward, clipping, {optimizers}"
                     f"{autocast}, at batch {batch} x {model_cfg.block_size}; {steps})")
        if self.interpreted:
            self.write("  triton runs in Triton's interpreter here: these times check that the "
                       "steps run, they are not a speed")
        rows = []
        for compiled in (False, True) if self.compile else (False,):
            if compiled and self.device.type != "cuda":
                self.write("  + compile: not timed (torch.compile cannot trace the interpreter)")
                continue
            try:
                times = verify.time_steps(model_cfg, step_cfg, self.device, self.amp_dtype,
                                          backends, compiled, rounds, warmup)
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                self.write(f"  {'+ compile: ' if compiled else ''}not timed: out of memory")
                continue
            ms = verify.median_ms(times)
            for backend in backends:
                name = backend + (" + compile" if compiled else "")
                speedup = ms["torch"] / ms[backend]
                vs = f"{speedup:.3g}x torch" if backend != "torch" else ""
                throughput = tokens / ms[backend] * 1e3
                self.write(f"  {name:17s} {ms[backend]:9.2f} ms {throughput:13,.0f} tokens/s   "
                           f"{vs}".rstrip())
                rows.append({"backend": backend, "compile": compiled, "ms": ms[backend],
                             "tokens_per_s": throughput,
                             "vs_torch": speedup, "steps_ms": times[backend]})
        if unusable:
            self.write(f"  triton: not timed ({unusable})")
        self.report["speed"] = {"batch": batch, "block": model_cfg.block_size, "rounds": rounds,
                                "warmup": warmup, "interpreted": self.interpreted, "rows": rows}
        return next((r["vs_torch"] for r in rows if r["backend"] == "triton"
                     and not r["compile"]), None)


def auto_verdict(speedup: float | None) -> str:
    """What `--backend auto` takes at the doctor's shape, from triton's eager speed-up over torch
    (None: the step was not timed, so there is nothing to decide by)."""
    if speedup is None:
        return "not known: the training step could not be timed (out of memory)"
    return f"{'triton' if speedup >= 1 else 'torch'} (triton {speedup:.2f}x torch)"


def _json_check(check: verify.OpCheck) -> dict:
    entry = dataclasses.asdict(check)
    if not math.isfinite(entry["ratio"]):
        entry["ratio"] = None  # JSON has no infinity
    return entry


def run_doctor(device: torch.device, model_cfg: ModelConfig, cfg: TrainConfig, compile: bool,
               interpreted: bool, json_path: str | None) -> int:
    """Print the report to stdout (and write it to `json_path`); return the exit status."""
    def write(line: str) -> None:
        print(line, flush=True)

    path = None if json_path is None else Path(json_path)
    if path is not None and not path.parent.is_dir():
        raise UserError(f"--json {path}: {path.parent} is not a directory")
    doctor = Doctor(device, model_cfg, cfg, compile, interpreted, write)
    model = ("the bigram model" if model_cfg.model == "bigram" else
             f"{model_cfg.n_layer} layers x {model_cfg.n_head} heads x {model_cfg.n_embd} wide")
    write(f"tinygpt doctor: {device_words(device)}; {model}, block {model_cfg.block_size}, "
          f"batch {cfg.batch_size}")
    status = doctor.run()
    if path is not None:
        report = {"model": dataclasses.asdict(model_cfg), "batch_size": cfg.batch_size,
                  **doctor.report}
        try:
            path.write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {path} ({os_reason(e)}); the report is above") from e
        write(f"\nwrote {path}")
    return status
