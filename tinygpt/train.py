"""The training loop: AdamW with warm-up and cosine decay, periodic evaluation, checkpoints.

Checkpoints go to `out_dir`: `best.pt` whenever the validation loss improves and `last.pt` at
every evaluation, at the end and on SIGINT/SIGTERM. `--resume` continues from `last.pt` exactly:
weights, optimizer, iteration and every random stream are restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import torch

from . import ops
from .checkpoint import load_checkpoint, restore, save_checkpoint
from .config import ModelConfig, TrainConfig, from_preset
from .data import Batches, Tokenizer, default_corpus, read_text
from .errors import UserError
from .model import LanguageModel, build_model


def pick_device(name: str) -> torch.device:
    """`auto` means cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was requested but MPS is not available on this machine")
    return device


def precision(device: torch.device) -> tuple[torch.dtype | None, str]:
    """Autocast dtype for `device` (None: full fp32) and a words for it."""
    if device.type != "cuda":
        return None, "fp32"
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, "bf16 autocast"
    return torch.float16, "fp16 autocast + GradScaler"


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, cosine decay to `min_lr` at `lr_decay_iters`, then flat."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: LanguageModel, cfg: TrainConfig, device: torch.device):
    """AdamW; weight decay on matrices (and embeddings) only, never on gains and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused,
                             foreach=None if fused else True)


@torch.no_grad()
def estimate_loss(model, batches: Batches, eval_iters: int, autocast) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split, with dropout off."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = torch.zeros(eval_iters, device=batches.device)
        for i in range(eval_iters):
            x, y = batches.get(split)
            with autocast():
                losses[i] = model(x, y)[1]
        out[split] = losses.mean().item()
    model.train(was_training)
    return out


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Progress:
    """One self-rewriting status line on a terminal; a line every `every` steps otherwise."""

    def __init__(self, total: int, tokens_per_iter: int, every: int):
        self.total, self.tokens_per_iter, self.every = total, tokens_per_iter, every
        self.tty = sys.stderr.isatty()
        self.t_last, self.it_last = time.perf_counter(), None
        self.width = 0

    def update(self, it: int, loss: float) -> None:
        now = time.perf_counter()
        if self.it_last is not None and it > self.it_last:
            ms = 1000 * (now - self.t_last) / (it - self.it_last)
            speed = f"{ms:.1f} ms/iter | {self.tokens_per_iter / ms * 1000:,.0f} tok/s"
        else:
            speed = "warming up"
        self.t_last, self.it_last = now, it
        done = int(20 * it / max(1, self.total))
        line = f"[{'#' * done}{'.' * (20 - done)}] {it}/{self.total} loss {loss:.4f} | {speed}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if self.tty and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            self.width = 0
        print(text, file=sys.stderr, flush=True)


def _load_corpus(data: str | None) -> tuple[str, str]:
    path = Path(data) if data else default_corpus()
    return read_text(path), str(path)


def _resume_configs(ckpt: dict, overrides: dict) -> tuple[ModelConfig, TrainConfig]:
    """The checkpoint's configs; training fields may be overridden, model fields must agree."""
    model_cfg = ModelConfig(**ckpt["model_config"])
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, value in overrides.items():
        if name in model_names and value is not None and getattr(model_cfg, name) != value:
            raise UserError(
                f"--{name.replace('_', '-')} {value} differs from the checkpoint's "
                f"{getattr(model_cfg, name)}; a resumed run keeps the model it was started with"
            )
    train_values = {**ckpt["train_config"],
                    **{k: v for k, v in overrides.items() if k not in model_names and v is not None}}
    train_cfg = TrainConfig(**train_values)
    train_cfg.validate()
    return model_cfg, train_cfg


def train(preset: str = "shakespeare-char", overrides: dict | None = None, data: str | None = None,
          resume: bool = False, log_interval: int = 10) -> dict:
    """Train a model; returns a summary (losses, timings, checkpoint paths)."""
    overrides = dict(overrides or {})
    ckpt = None
    if resume:
        ckpt_path = Path(overrides.get("out_dir") or TrainConfig.out_dir) / "last.pt"
        ckpt = load_checkpoint(ckpt_path)
    else:
        model_cfg, cfg = from_preset(preset, **overrides)  # bad options fail before any I/O
    text, data_name = _load_corpus(data)
    tokenizer = Tokenizer.from_text(text)
    if ckpt is not None:
        if ckpt["vocab"] != tokenizer.chars:
            raise UserError(
                f"{data_name} has a different vocabulary ({tokenizer.vocab_size} characters) "
                f"from the checkpoint's ({len(ckpt['vocab'])}); resume with the same data"
            )
        model_cfg, cfg = _resume_configs(ckpt, overrides)
    else:
        model_cfg.vocab_size = tokenizer.vocab_size

    device = pick_device(cfg.device)
    backend = ops.resolve_backend(cfg.backend, device)
    if cfg.compile and backend == "triton" and device.type != "cuda":
        raise UserError("--compile with the triton backend needs CUDA: the Triton interpreter "
                        "cannot be traced")
    amp_dtype, amp_words = precision(device)
    torch.manual_seed(cfg.seed)
    batches = Batches(text, tokenizer, model_cfg.block_size, cfg.batch_size, device, cfg.seed)
    model = build_model(model_cfg, backend).to(device)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_iter, best_val = 0, math.inf
    if ckpt is not None:
        restore(model, ckpt["model"], ckpt_path)
        restore(optimizer, ckpt["optimizer"], ckpt_path, what="optimizer state")
        start_iter, best_val = ckpt["iteration"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        batches.load_state(ckpt["rng"]["batches"])
    step_model = torch.compile(model) if cfg.compile else model

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    out_dir = Path(cfg.out_dir)
    tokens_per_iter = cfg.batch_size * model_cfg.block_size
    progress = Progress(cfg.max_iters, tokens_per_iter, log_interval)
    progress.message(
        f"tinygpt: {model_cfg.model} {model.num_params() / 1e6:.2f}M params | data {data_name} "
        f"({len(text):,} chars, vocab {tokenizer.vocab_size}) | device {device} ({amp_words}) | "
        f"backend {backend}{' + compile' if cfg.compile else ''}"
        + (f" | resuming at iteration {start_iter}" if ckpt else "")
    )

    def checkpoint(iteration: int) -> dict:
        return {
            "model_config": dataclasses.asdict(model_cfg),
            "train_config": dataclasses.asdict(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "best_val_loss": best_val,
            "vocab": tokenizer.chars,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "batches": batches.state(),
            },
        }

    history: list[dict] = []
    t0 = time.perf_counter()
    it = start_iter
    stopped_by = None
    with StopRequest() as stop:
        while True:
            at_eval = it % cfg.eval_interval == 0 or it == cfg.max_iters
            if at_eval and not (ckpt is not None and it == start_iter):
                losses = estimate_loss(step_model, batches, cfg.eval_iters, autocast)
                if not all(map(math.isfinite, losses.values())):
                    raise UserError(_diverged_message(it, out_dir, cfg.lr))
                history.append({"iter": it, **losses, "seconds": time.perf_counter() - t0})
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                progress.message(f"step {it}: train loss {losses['train']:.4f}, "
                                 f"val loss {losses['val']:.4f}{' (best)' if improved else ''}")
                payload = checkpoint(it)
                if improved:
                    save_checkpoint(out_dir / "best.pt", payload)
                save_checkpoint(out_dir / "last.pt", payload)
            if it >= cfg.max_iters:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, cfg)
            x, y = batches.get("train")
            with autocast():
                _, loss = step_model(x, y)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            if it % log_interval == 0 or it == cfg.max_iters:
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise UserError(_diverged_message(it, out_dir, cfg.lr))
                progress.update(it, loss_value)
            if stop.signum is not None:
                stopped_by = stop.signum
                save_checkpoint(out_dir / "last.pt", checkpoint(it))
                break

    elapsed = time.perf_counter() - t0
    steps = it - start_iter
    summary = {
        "iterations": it,
        "steps": steps,
        "seconds": elapsed,
        "tokens_per_second": steps * tokens_per_iter / elapsed if elapsed > 0 else 0.0,
        "best_val_loss": best_val,
        "history": history,
        "out_dir": str(out_dir),
        "interrupted_by": stopped_by,
    }
    final = history[-1] if history else None
    progress.message(
        f"done: {steps} steps in {elapsed:.1f}s ({summary['tokens_per_second']:,.0f} tok/s)"
        + (f" | final val loss {final['val']:.4f}" if final and final["iter"] == it else "")
        + f" | best val loss {best_val:.4f} | checkpoints in {out_dir}/"
        + (f" | stopped by {signal.Signals(stopped_by).name} at iteration {it}; "
           f"continue with --resume" if stopped_by else "")
    )
    return summary


def _diverged_message(it: int, out_dir: Path, lr: float) -> str:
    return (f"loss is not finite at iteration {it}: training diverged; the last good "
            f"checkpoint is kept in {out_dir}/ (try a learning rate below {lr:g})")
