"""Will a training run fit in the device's memory: a lower bound of what it needs against what the
device has free, then a step tried on a batch of zeros before anything is written, and
out-of-memory errors turned into one line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import UserError

BYTES_PER_PARAM = 16  # fp32 weight, gradient and AdamW's two moments (Muon keeps one)
# Values per token and layer that a pre-norm block keeps for its backward pass, in units of
# n_embd, counted low: the two LayerNorm inputs (2), their outputs (2), q, k, v (3), the attention
# output and its merged heads (2), the MLP's hidden layer before and after GELU (8) make 17.
SAVED_PER_TOKEN_LAYER = 12
GIB = 2**30


def training_bytes(cfg: ModelConfig, batch_size: int, autocast: bool,
                   optimizer: str = "adamw") -> int:
    """At least this many bytes train `cfg` on batches of `batch_size` with `optimizer`:
    parameters with their gradients and optimizer state, the activations one micro-batch keeps
    for backward (2 bytes a value under autocast, else 4) and its fp32 logits. The corpus is
    read from a memory map a batch at a time: it takes no memory of the device's own."""
    tokens = batch_size * cfg.block_size
    value = 2 if autocast else 4
    activations = 0
    if cfg.model == "gpt":
        activations = tokens * cfg.n_layer * cfg.n_embd * SAVED_PER_TOKEN_LAYER * value
    logits = tokens * cfg.vocab_size * 4
    # Muon keeps one fp32 momentum, not two moments, for the blocks' four matrices (12 C^2)
    muon = 12 * cfg.n_layer * cfg.n_embd**2 if optimizer == "muon" and cfg.model == "gpt" else 0
    state = cfg.num_params() * BYTES_PER_PARAM - muon * 4
    return state + activations + logits


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new allocations on `device`, or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    meminfo = Path("/proc/meminfo")  # Linux; elsewhere the CPU is not checked up front
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in meminfo.read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return None


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU and MPS allocators' RuntimeErrors, Python's MemoryError."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text
                                            or "can't allocate memory" in text)


def _count(n: int) -> str:
    return f"{n / 1e9:,.1f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def advice(cfg: ModelConfig, batch_size: int) -> str:
    shrink = f"lower --batch-size ({batch_size}) or --block-size ({cfg.block_size})"
    if cfg.model == "gpt":
        shrink += f", or the model's --n-layer ({cfg.n_layer}) or --n-embd ({cfg.n_embd})"
    return shrink


def check_fits(device: torch.device, cfg: ModelConfig, batch_size: int, autocast: bool,
               optimizer: str) -> None:
    """Refuse, before anything is allocated, a run that cannot fit in what `device` has free."""
    need = training_bytes(cfg, batch_size, autocast, optimizer)
    free = free_bytes(device)
    if free is not None and need > free:
        raise UserError(
            f"training needs at least {need / GIB:,.1f} GiB ({_count(cfg.num_params())} "
            f"parameters, batches of {batch_size} x {cfg.block_size} characters) but {device} has "
            f"{free / GIB:,.1f} GiB free; {advice(cfg, batch_size)}")


def sampling_advice(cfg: ModelConfig, cache: str) -> str:
    """What to change when sampling from a model of `cfg` runs out of memory."""
    if cfg.model == "gpt" and cache != "off":
        return (f"the key/value cache holds {cfg.block_size:,} positions of every layer; "
                "--cache off keeps none, or sample on a --device with more memory")
    return "sample on a --device with more memory"


@contextlib.contextmanager
def reported(device: torch.device, doing: str, advice: str, kept: str):
    """Turn running out of memory on `device` while `doing` into one UserError line that says
    what to change (`advice`) and what happened to the checkpoints (`kept`)."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(f"out of memory on {device} while {doing}; {advice} ({kept})") from e


class Guard:
    """`with guard(doing):` turns running out of memory into `reported`'s one line, which says
    whether the checkpoints `writer` (a `checkpoint.Writer`) has written are kept."""

    def __init__(self, device: torch.device, cfg: ModelConfig, batch_size: int, writer):
        self.device, self.advice, self.writer = device, advice(cfg, batch_size), writer

    def __call__(self, doing: str):
        kept = (f"the checkpoints in {self.writer.out_dir}/ are kept" if self.writer.wrote
                else "nothing was written")
        return reported(self.device, doing, self.advice, kept)


def try_step(model: torch.nn.Module, optimizer, batch_size: int, block_size: int,
             device: torch.device, autocast: Callable) -> None:
    """A forward and backward pass on a batch of zeros before anything is written, so that a
    batch too large for the device fails here. Weights, gradients (`optimizer` zeroes them) and
    every random stream are left as they were."""
    x = torch.zeros((batch_size, block_size), dtype=torch.long, device=device)  # (B, T)
    accelerator = device.type != "cpu"
    with torch.random.fork_rng([device] if accelerator else [],
                               device_type=device.type if accelerator else "cuda"):
        with autocast():
            _, loss = model(x, x)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
