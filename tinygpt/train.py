"""The training loop: AdamW with warm-up and cosine decay, periodic evaluation, checkpoints.

Checkpoints go to `out_dir`: `best.pt` whenever the validation loss improves and `last.pt` at
every evaluation, at the end and on SIGINT/SIGTERM. `--resume` continues from `last.pt` exactly:
weights, optimizer, iteration and every random stream are restored (on another number of
processes, all but the per-rank dropout streams).
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

from . import distributed, launch, memory, ops
from .checkpoint import load_checkpoint, restore, save_checkpoint
from .config import ModelConfig, TrainConfig, from_preset
from .data import Batches, Tokenizer, default_corpus, read_text
from .errors import UserError
from .model import LanguageModel, attention_shape, build_model

DEVICES = "auto, cpu, cuda, cuda:N or mps"


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto` means cuda, then mps, then cpu; an explicit device that is absent is an error.
    Under torchrun (`local_rank` given) a process takes GPU cuda:LOCAL_RANK."""
    if local_rank is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        name = f"cuda:{local_rank}"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}; use {DEVICES}") from e
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {name!r} is not supported; use {DEVICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was requested but MPS is not available on this machine")
    return device


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
            x, y = batches.get(split)  # the evaluation stream
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
    """One self-rewriting status line on a terminal, a line per update otherwise; silent when
    not `enabled` (every rank but the first)."""

    def __init__(self, total: int, tokens_per_iter: int, enabled: bool = True):
        self.total, self.tokens_per_iter, self.enabled = total, tokens_per_iter, enabled
        self.tty = sys.stderr.isatty()
        self.t_last, self.it_last = time.perf_counter(), None
        self.width = 0

    def update(self, it: int, loss: float) -> None:
        if not self.enabled:
            return
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
        if not self.enabled:
            return
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
    train_overrides = {k: v for k, v in overrides.items()
                       if k not in model_names and v is not None}
    train_values = {**ckpt["train_config"], **train_overrides}
    train_cfg = TrainConfig(**train_values)
    train_cfg.validate()
    return model_cfg, train_cfg


def train(preset: str = "shakespeare-char", overrides: dict | None = None, data: str | None = None,
          resume: bool = False, log_interval: int = 10, overwrite: bool = False) -> dict:
    """Train a model; returns a summary: losses, timings, checkpoint paths and the model.

    A new run refuses an out_dir that holds another run's checkpoints unless `overwrite`.

    Under torchrun every process runs this: data parallel, rank 0 evaluates and checkpoints.
    Without a `grad_accum` override a new run gives every process the preset's micro-batches
    (the global batch grows with the processes); with one, they share its micro-batches out.
    """
    overrides = dict(overrides or {})
    ckpt = ckpt_path = None
    if resume:
        ckpt_path = Path(overrides.get("out_dir") or TrainConfig.out_dir) / "last.pt"
        ckpt = load_checkpoint(ckpt_path)
    else:
        model_cfg, cfg = from_preset(preset, **overrides)  # bad options fail before any I/O
        previous = Path(cfg.out_dir) / "last.pt"
        if previous.exists() and not overwrite:
            raise UserError(f"{cfg.out_dir}/ already holds a run ({previous.name}); continue it "
                            "with --resume, or pass --overwrite or another --out-dir")
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
    ctx = launch.from_environment()
    if ckpt is None and overrides.get("grad_accum") is None:
        cfg.grad_accum *= ctx.world_size  # the preset's micro-batches on every process
    if cfg.grad_accum % ctx.world_size:
        raise UserError(f"grad_accum ({cfg.grad_accum}) must be a multiple of the number of "
                        f"processes ({ctx.world_size}), which share its micro-batches out")
    device = pick_device(cfg.device, ctx.local_rank if ctx.enabled else None)
    distributed.start(ctx, device)
    try:
        return _Run(ctx, device, model_cfg, cfg, text, data_name, tokenizer, ckpt, ckpt_path,
                    log_interval).loop()
    finally:
        distributed.stop()


class _Run:
    """One training run's state: model, optimizer, data streams, and the loop over steps."""

    def __init__(self, ctx, device, model_cfg, cfg, text, data_name, tokenizer, ckpt, ckpt_path,
                 log_interval):
        self.ctx, self.device, self.model_cfg, self.cfg = ctx, device, model_cfg, cfg
        self.tokenizer, self.log_interval = tokenizer, log_interval
        self.out_dir = Path(cfg.out_dir)
        self.wrote = ckpt is not None  # whether out_dir holds this run's checkpoints
        backend = ops.resolve_backend(cfg.backend, device,
                                      attention_shape(model_cfg, cfg.batch_size))
        if cfg.compile and backend == "triton" and device.type != "cuda":
            raise UserError("--compile with the triton backend needs CUDA: the Triton interpreter "
                            "cannot be traced")
        self.amp_dtype, amp_words = ops.precision(device)
        memory.check_fits(device, model_cfg, cfg.batch_size, len(text), self.amp_dtype is not None)
        # Micro-batch m of every step comes from data stream m; rank r owns a contiguous share of
        # the streams, so the global batch does not depend on the number of processes.
        per_rank = cfg.grad_accum // ctx.world_size
        self.streams = range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
        with self._out_of_memory_reported("copying the corpus to it"):
            self.batches = Batches(text, tokenizer, model_cfg.block_size, cfg.batch_size, device,
                                   cfg.seed, self.streams)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        with self._out_of_memory_reported("building the model"):
            self.model = build_model(model_cfg, backend).to(device)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout: a different stream on every rank
        self.start_iter, self.best_val = 0, math.inf
        self.skip_first_eval = False  # a resumed run's first evaluation may be done already
        if ckpt is not None:
            self._restore(ckpt, ckpt_path)
        self.eval_model = torch.compile(self.model) if cfg.compile else self.model
        self.tokens_per_iter = cfg.batch_size * cfg.grad_accum * model_cfg.block_size
        self.progress = Progress(cfg.max_iters, self.tokens_per_iter, enabled=ctx.is_main)
        self.progress.message(
            f"tinygpt: {model_cfg.model} {self.model.num_params() / 1e6:.2f}M params | data "
            f"{data_name} ({len(text):,} chars, vocab {tokenizer.vocab_size}) | device {device} "
            f"({amp_words}) | backend {backend}{' + compile' if cfg.compile else ''}"
            + (f" | {ctx.world_size} processes x {per_rank} micro-batch"
               f"{'es' if per_rank > 1 else ''} of {cfg.batch_size} (global batch "
               f"{cfg.batch_size * cfg.grad_accum})" if ctx.enabled else "")
            + (f" | resuming at iteration {self.start_iter}" if ckpt is not None else ""))
        with self._out_of_memory_reported("trying a training step"):
            self._try_step()
        self.step_model = self.eval_model
        if ctx.enabled:
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.eval_model, device_ids=[device.index] if device.type == "cuda" else None)

    def _out_of_memory_reported(self, doing: str):
        kept = (f"the checkpoints in {self.out_dir}/ are kept" if self.wrote
                else "nothing was written")
        return memory.reported(self.device, doing, self.model_cfg, self.cfg.batch_size, kept)

    def _try_step(self) -> None:
        """A forward and backward pass on a batch of zeros before anything is written, so that a
        batch too large for the device fails here. Weights, gradients and every random stream
        are left as they were."""
        shape = (self.cfg.batch_size, self.model_cfg.block_size)
        x = torch.zeros(shape, dtype=torch.long, device=self.device)  # (B, T)
        accelerator = self.device.type != "cpu"
        with torch.random.fork_rng([self.device] if accelerator else [],
                                   device_type=self.device.type if accelerator else "cuda"):
            with self.autocast():
                _, loss = self.eval_model(x, x)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)

    def _restore(self, ckpt: dict, path: Path) -> None:
        missing = sorted({"optimizer", "rng", "best_val_loss", "evaluated"} - ckpt.keys())
        if missing:
            raise UserError(f"checkpoint {path} lacks the training state to resume from "
                            f"({', '.join(missing)})")
        restore(self.model, ckpt["model"], path)
        restore(self.optimizer, ckpt["optimizer"], path, what="optimizer state")
        self.start_iter, self.best_val = ckpt["iteration"], ckpt["best_val_loss"]
        self.skip_first_eval = ckpt["evaluated"]
        rng = ckpt["rng"]
        if len(rng["torch"]) == self.ctx.world_size:  # per-rank dropout streams: same count only
            torch.set_rng_state(rng["torch"][self.ctx.rank])
            if self.device.type == "cuda" and rng["cuda"] is not None:
                torch.cuda.set_rng_state(rng["cuda"][self.ctx.rank], self.device)
        self.batches.load_state(rng["batches"])

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def checkpoint(self, iteration: int, evaluated: bool) -> dict | None:
        """The checkpoint payload on rank 0 (None elsewhere); every rank must call this.
        `evaluated`: whether this iteration's evaluation (if it has one) is done."""
        cuda = self.device.type == "cuda"
        torch_states = distributed.gather(torch.get_rng_state())
        cuda_states = distributed.gather(torch.cuda.get_rng_state(self.device) if cuda else None)
        batch_states = distributed.gather(self.batches.state())
        if not self.ctx.is_main:
            return None
        return {
            "model_config": dataclasses.asdict(self.model_cfg),
            "train_config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iteration": iteration,
            "evaluated": evaluated,
            "best_val_loss": self.best_val,
            "vocab": self.tokenizer.chars,
            "rng": {"torch": torch_states, "cuda": cuda_states if cuda else None,
                    "batches": Batches.merge_states(batch_states)},
        }

    def evaluate(self, it: int, t0: float) -> dict | None:
        """Rank 0 measures both losses and writes the checkpoints; all ranks stop together if
        the loss diverged."""
        losses = None
        if self.ctx.is_main:
            losses = estimate_loss(self.eval_model, self.batches, self.cfg.eval_iters,
                                   self.autocast)
        payload = self.checkpoint(it, evaluated=True)
        diverged = losses is not None and not all(map(math.isfinite, losses.values()))
        if distributed.any_rank(diverged, self.device):
            raise UserError(_diverged_message(it, self.out_dir, self.cfg.lr))
        if losses is None:
            return None
        improved = losses["val"] < self.best_val
        self.best_val = min(self.best_val, losses["val"])
        payload["best_val_loss"] = self.best_val
        self.progress.message(f"step {it}: train loss {losses['train']:.4f}, "
                              f"val loss {losses['val']:.4f}{' (best)' if improved else ''}")
        if improved:
            save_checkpoint(self.out_dir / "best.pt", payload)
        save_checkpoint(self.out_dir / "last.pt", payload)
        self.wrote = True
        return {"iter": it, **losses, "seconds": time.perf_counter() - t0}

    def step(self, it: int) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns their mean loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(it, self.cfg)
        total = torch.zeros((), device=self.device)
        for m in self.streams:
            x, y = self.batches.get("train", stream=m)
            last = m == self.streams[-1]
            skip_sync = self.ctx.enabled and not last  # all-reduce on the last micro-batch only
            with self.step_model.no_sync() if skip_sync else contextlib.nullcontext():
                with self.autocast():
                    _, loss = self.step_model(x, y)
                self.scaler.scale(loss / len(self.streams)).backward()
            total += loss.detach()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(self.streams)

    def loop(self) -> dict:
        cfg = self.cfg
        history: list[dict] = []
        t0 = time.perf_counter()
        it, stopped_by = self.start_iter, 0
        with StopRequest() as stop:
            while True:
                at_eval = it % cfg.eval_interval == 0 or it == cfg.max_iters
                if at_eval and not (self.skip_first_eval and it == self.start_iter):
                    with self._out_of_memory_reported(f"evaluating at step {it}"):
                        entry = self.evaluate(it, t0)
                    if entry is not None:
                        history.append(entry)
                if it >= cfg.max_iters:
                    break
                with self._out_of_memory_reported(f"training step {it + 1}"):
                    loss = self.step(it)
                it += 1
                at_log = it % self.log_interval == 0 or it == cfg.max_iters
                if at_log:
                    loss_value = loss.item()
                    if distributed.any_rank(not math.isfinite(loss_value), self.device):
                        raise UserError(_diverged_message(it, self.out_dir, cfg.lr))
                    self.progress.update(it, loss_value)
                if at_log or not self.ctx.enabled:  # ranks agree on stopping at log steps
                    stopped_by = int(distributed.max_over_ranks(stop.signum or 0, self.device))
                if stopped_by:
                    payload = self.checkpoint(it, evaluated=False)
                    if payload is not None:
                        save_checkpoint(self.out_dir / "last.pt", payload)
                    break
        return self.summary(it, time.perf_counter() - t0, history, stopped_by)

    def summary(self, it: int, elapsed: float, history: list[dict], stopped_by: int) -> dict:
        steps = it - self.start_iter
        summary = {
            "iterations": it, "steps": steps, "seconds": elapsed,
            "tokens_per_second": steps * self.tokens_per_iter / elapsed if elapsed > 0 else 0.0,
            "best_val_loss": self.best_val, "history": history, "out_dir": str(self.out_dir),
            "interrupted_by": stopped_by or None, "model": self.model,
        }
        final = history[-1] if history else None
        self.progress.message(
            f"done: {steps} steps in {elapsed:.1f}s ({summary['tokens_per_second']:,.0f} tok/s)"
            + (f" | final val loss {final['val']:.4f}" if final and final["iter"] == it else "")
            + f" | best val loss {self.best_val:.4f} | checkpoints in {self.out_dir}/"
            + (f" | stopped by {signal.Signals(stopped_by).name} at iteration {it}; "
               f"continue with --resume" if stopped_by else ""))
        return summary


def _diverged_message(it: int, out_dir: Path, lr: float) -> str:
    return (f"loss is not finite at iteration {it}: training diverged; the last good "
            f"checkpoint is kept in {out_dir}/ (try a learning rate below {lr:g})")
