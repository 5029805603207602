"""Whether a run may use the Triton kernels: checked on this GPU first, and under `auto` taken only
where they measured faster than torch.

The first time a run meets a GPU (its name and compute capability), torch, Triton and kernel
source (a hash of `tinygpt/kernels/*.py`), and a shape, `verify.check_kernels` runs at the run's
shape before the first step; `auto` then times a training step on each backend at the run's
exact model, batch, dtype, optimizers and compile setting. Both results are cached in
CACHE/kernel-checks/ (`data.cache_dir`, TINYGPT_CACHE), one JSON file per key holding the key
itself, so a later run with the same key starts at once. A file that is missing, unreadable or
not what its key promises is measured again; a cache that cannot be written costs only the
re-measuring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tinygpt import kernels

from . import distributed, ops, verify
from .config import ModelConfig, TrainConfig
from .data import cache_dir
from .errors import UserError, os_reason
from .files import write_atomically
from .model import attention_shape

KERNEL_SOURCES = Path(kernels.__file__).parent
# Devices whose runs check the kernels before trusting them. Off CUDA the kernels run only in
# Triton's interpreter, which is the test suite's harness (its tests add "cpu").
CHECKED_DEVICES = ("cuda",)
TIMED_ROUNDS, TIMED_WARMUP = 5, 2  # steps per backend for auto's choice, after the warm-up


@dataclasses.dataclass(frozen=True)
class Choice:
    """The backend a run takes, and why, for its start line."""

    backend: str
    why: str = ""


def source_hash(directory: Path | None = None) -> str:
    """sha256 of the kernels' Python sources (`directory`: KERNEL_SOURCES), names and bytes."""
    digest = hashlib.sha256()
    for path in sorted((directory or KERNEL_SOURCES).glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def device_words(device: torch.device) -> str:
    """The device as its start line and messages name it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device} (Triton's interpreter)"


def environment_key(device: torch.device) -> dict:
    """What a verdict depends on besides the shape: the GPU, torch, Triton and the kernels."""
    import triton

    capability = (".".join(map(str, torch.cuda.get_device_capability(device)))
                  if device.type == "cuda" else "interpreter")
    return {"device": device_words(device), "capability": capability,
            "torch": torch.__version__, "triton": triton.__version__, "kernels": source_hash()}


def _path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / "kernel-checks" / f"{digest}.json"


def _load(key: dict, valid: Callable[[dict], bool]) -> dict | None:
    """The cached result for `key`, or None when there is none to trust."""
    try:
        entry = json.loads(_path(key).read_text())
        if entry["key"] == key and valid(entry["result"]):
            return entry["result"]
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return None


def _store(key: dict, result: dict, say: Callable[[str], None]) -> None:
    """Write the entry atomically (another process of a torchrun job may write the same one)."""
    path = _path(key)
    entry = json.dumps({"key": key, "result": result}, indent=1).encode()
    try:
        write_atomically(path, lambda f: f.write(entry))
    except OSError as e:
        say(f"could not cache the result in {path.parent} ({os_reason(e)}); the next run "
            "measures again")


def _valid_verdict(result: dict) -> bool:
    return (isinstance(result.get("passed"), bool)
            and all(isinstance(result.get(k), str) for k in ("op", "tensor", "note"))
            and all(isinstance(result.get(k), (int, float)) for k in ("ratio", "limit")))


def _valid_timing(result: dict) -> bool:
    ms = result.get("ms")
    return (isinstance(ms, dict) and set(ms) == {"torch", "triton"}
            and all(isinstance(v, (int, float)) and v > 0 for v in ms.values()))


def verified(shape: verify.Shape, device: torch.device, out_dtype: torch.dtype | None,
             say: Callable[[str], None], between: Callable[[], None] = lambda: None
             ) -> verify.OpCheck:
    """The worst op of `verify.check_kernels` at `shape` on `device`, from the cache when this
    environment and shape were checked before."""
    key = {**environment_key(device), "shape": shape.describe(), "bias": shape.bias,
           "dropout": shape.dropout, "out_dtype": str(out_dtype)}
    if (cached := _load(key, _valid_verdict)) is not None:
        return verify.OpCheck(**cached)
    say(f"checking the Triton kernels on {device_words(device)} at {shape.describe()} against "
        "the fp64 reference (once for this GPU, torch, Triton and shape)")
    start = time.perf_counter()
    worst = verify.worst(verify.check_kernels(shape, device, out_dtype, between))
    if worst.passed:
        say(f"the kernels passed in {time.perf_counter() - start:.1f} s (Triton's compiling "
            "included)")
    _store(key, dataclasses.asdict(worst), say)
    return worst


def timed(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device,
          amp_dtype: torch.dtype | None, say: Callable[[str], None],
          between: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median ms per training step on the torch and triton backends at this exact run shape and
    with the run's optimizers (`cfg`), from the cache when it was timed before."""
    key = {**environment_key(device), "model": dataclasses.asdict(model_cfg),
           "batch_size": cfg.batch_size, "amp_dtype": str(amp_dtype), "compile": cfg.compile,
           "optimizer": cfg.optimizer,
           "muon_ns_steps": cfg.muon_ns_steps if cfg.optimizer == "muon" else None}
    if (cached := _load(key, _valid_timing)) is not None:
        return cached["ms"]
    say(f"timing a training step on the triton and torch backends at batch {cfg.batch_size} x "
        f"{model_cfg.block_size}{' under torch.compile' if cfg.compile else ''} (once for this "
        "shape)")
    start = time.perf_counter()
    times = verify.time_steps(model_cfg, cfg, device, amp_dtype, ("triton", "torch"),
                              cfg.compile, TIMED_ROUNDS, TIMED_WARMUP, between)
    ms = verify.median_ms(times)
    say(f"timed in {time.perf_counter() - start:.1f} s: {ms['triton']:.2f} ms a step on triton, "
        f"{ms['torch']:.2f} ms on torch")
    _store(key, {"ms": ms}, say)
    return ms


def settle(resolved: str, device: torch.device, model_cfg: ModelConfig, cfg: TrainConfig,
           amp_dtype: torch.dtype | None, *, explicit: bool, by_speed: bool,
           say: Callable[[str], None], between: Callable[[], None] = lambda: None) -> Choice:
    """The backend a run of `model_cfg` and `cfg` takes, given `resolved`
    (`ops.resolve_backend`'s answer).

    Only `triton` is examined: checked first (`verified`). A failure is an error when the user
    asked for triton (`explicit`), else the run takes torch with one line saying why. With
    `by_speed` (auto on a new run), triton is kept only if a training step measured at least as
    fast as torch's at this shape. `say` prints a line for the user; `between` is called
    between kernels and steps (a stop request may raise there)."""
    if (resolved != "triton" or device.type not in CHECKED_DEVICES
            or model_cfg.model == "bigram"):  # the bigram model runs no kernel
        return Choice(resolved)
    name = device_words(device)
    shape = verify.Shape.of(model_cfg, cfg.batch_size, amp_dtype or torch.float32).capped()
    worst = verified(shape, device, amp_dtype, say, between)
    if not worst.passed:
        reason = f"{worst.op}: {worst.reason()}"
        if explicit:
            raise UserError(f"backend 'triton': the kernels failed their check on {name} "
                            f"({reason}); use --backend torch, and see `tinygpt doctor`")
        if not _usable(device):  # a kernel's fault left the CUDA context broken for torch too
            raise UserError(f"the Triton kernels crashed on {name} ({reason}); the verdict is "
                            "cached, so the command run again uses the torch backend "
                            "(`tinygpt doctor` prints the full report)")
        say(f"the Triton kernels failed their check on {name} ({reason}); using the torch "
            "backend instead (`tinygpt doctor` prints the full report)")
        return Choice("torch", f"the Triton kernels failed their check on {name}")
    if not by_speed:
        return Choice("triton", f"verified on {name}")
    ms = timed(model_cfg, cfg, device, amp_dtype, say, between)
    speedup = ms["torch"] / ms["triton"]
    if speedup >= 1.0:
        return Choice("triton", f"verified on {name}, {speedup:.2f}x torch at this shape")
    return Choice("torch", f"triton verified on {name} but {1 / speedup:.2f}x slower than "
                           "torch at this shape")


def _usable(device: torch.device) -> bool:
    """Whether `device` still runs work: a fault in a kernel (an illegal address, say) leaves a
    CUDA context failing every later call."""
    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1).cpu()
        torch.cuda.synchronize(device)
    except RuntimeError:
        return False
    return True


def agree(choice: Choice, resolved: str, device: torch.device) -> Choice:
    """One backend for every process of a torchrun job: torch if any process settled on it
    where triton was resolved (its check failed, or triton timed slower there)."""
    if resolved != "triton":
        return choice
    if distributed.any_rank(choice.backend != "triton", device) and choice.backend == "triton":
        return Choice("torch", "another process's check or timing chose torch")
    return choice


def choose(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device,
           amp_dtype: torch.dtype | None, previous: str | None, say: Callable[[str], None],
           between: Callable[[], None]) -> tuple[str, str]:
    """The backend a run takes and why (for its start line). A resumed run under `auto` keeps
    its checkpoint's (`previous`) where that can run here, so that it goes on bit for bit;
    otherwise `settle` decides, and every process of a job `agree`s."""
    shape = attention_shape(model_cfg, cfg.batch_size)
    request = ops.requested_backend(cfg.backend)[0]
    previous = previous if request == "auto" else None
    resolved = None
    if previous is not None:
        try:
            resolved = ops.resolve_backend(previous, device, shape)
        except UserError as e:
            say(f"the checkpoint was trained on the {previous} backend, which cannot run here "
                f"({e}); choosing again")
    kept = resolved is not None
    resolved = resolved or ops.resolve_backend(cfg.backend, device, shape)
    if cfg.compile and resolved == "triton" and device.type != "cuda":
        raise UserError("--compile with the triton backend needs CUDA: the Triton interpreter "
                        "cannot be traced")
    choice = settle(resolved, device, model_cfg, cfg, amp_dtype, explicit=request == "triton",
                    by_speed=request == "auto" and not kept, say=say, between=between)
    choice = agree(choice, resolved, device)
    why = "; ".join(w for w in ("kept from the checkpoint" if kept else "", choice.why) if w)
    return choice.backend, why
