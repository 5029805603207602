"""The training loop: optimizer steps (`tinygpt.optim`), periodic evaluation, checkpoints.

Checkpoints go to `out_dir`, which a run holds locked: `best.pt` whenever the validation loss
improves and `last.pt` at every evaluation, at the end and when a signal stops the run. `--resume`
continues from `last.pt` exactly. The run's plumbing is a line each here, in modules of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
import uuid
from pathlib import Path

import torch

from . import distributed, launch, memory, metrics, ops, streams, threads, trust
from .checkpoint import Writer
from .config import TrainConfig, from_preset
from .data import Batches
from .devices import cpu_words, pick_device
from .errors import Stopped, UserError
from .evaluate import bits
from .metrics import Metrics
from .model import build_model
from .optim import lower_rates, make_optimizer
from .progress import Progress, start_line
from .rundir import OutDirLock
from .signals import StopRequest, checks_between_layers
from .start import Start, restore, settle


def train(preset: str = "shakespeare-char", overrides: dict | None = None, data: str | None = None,
          resume: bool = False, log_interval: int = 10, overwrite: bool = False,
          new_data: bool = False, tune_threads: bool = False,
          join_timeout: float = launch.JOIN_TIMEOUT_S, record: bool = True,
          log: list[str] = ()) -> dict:
    """Train a model; returns a summary: losses, timings, checkpoint paths and the model.

    A new run refuses an out_dir that holds another run's checkpoints unless `overwrite`; a
    resumed one trains on the text its checkpoint names unless given `data` (another text needs
    `new_data`). SIGINT, SIGTERM and SIGHUP stop it with `last.pt` saved. With `tune_threads`, a
    run on the CPU times thread counts and takes the fastest (`tinygpt.threads`). Under torchrun
    every process runs this (data parallel; rank 0 evaluates and writes the checkpoints), and
    the processes give up on each other after `join_timeout` seconds if one does not start.
    Rank 0 keeps the run's record in OUT_DIR/metrics.jsonl (`tinygpt.metrics`) unless not
    `record` (the benchmark of its cost), and sends it to the loggers `log` names
    (`tinygpt.loggers`: "tensorboard", "wandb").
    """
    overrides = dict(overrides or {})
    ctx = launch.from_environment()
    out_dir = Path(overrides.get("out_dir") or TrainConfig.out_dir)
    configs = None if resume else from_preset(preset, **overrides)  # bad options fail before I/O
    # Rank 0 writes the checkpoints, so it holds the directory.
    with OutDirLock(out_dir) if ctx.is_main else contextlib.nullcontext(), \
            StopRequest(speak=ctx.is_main) as stop, threads.count_kept():
        start = settle(preset, configs, overrides, out_dir, ctx, data, new_data=new_data,
                       overwrite=overwrite)
        device = pick_device(start.cfg.device, ctx.local_rank if ctx.enabled else None)
        stop.check()
        with distributed.session(ctx, device, join_timeout):
            run = _Run(start, ctx, device, stop, log_interval=log_interval,
                       tune_threads=tune_threads, record=record, log=list(log))
            try:
                return run.loop()
            finally:
                run.close()  # the DDP wrapper goes before the process group it holds


@torch.no_grad()
def estimate_loss(model, batches: Batches, eval_iters: int, autocast, before_batch,
                  timed) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split, with dropout off. `before_batch(done,
    total)` is called before each of the 2 x eval_iters batches (progress, a stop request), and
    each batch runs within `timed()` (a `ThreadTuner`'s)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for s, split in enumerate(("train", "val")):
            losses = torch.zeros(eval_iters, device=batches.device)
            for i in range(eval_iters):
                before_batch(s * eval_iters + i, 2 * eval_iters)
                x, y = batches.get(split)  # the evaluation stream
                with timed(), autocast():
                    losses[i] = model(x, y)[1]
            out[split] = losses.mean().item()
    finally:
        model.train(was_training)
    return out


class _Run:
    """One training run's state: model, optimizer, data streams, and the loop over steps."""

    def __init__(self, start: Start, ctx: launch.Context, device: torch.device,
                 stop: StopRequest, *, log_interval: int, tune_threads: bool, record: bool,
                 log: list[str]):
        cfg, model_cfg = self.cfg, self.model_cfg = start.cfg, start.model_cfg
        self.ctx, self.device, self.stop, self.log_interval = ctx, device, stop, log_interval
        self.tokenizer, self.data = start.tokenizer, start.data  # data: the corpus record
        self.saved = Writer(Path(cfg.out_dir), start.replacing, wrote=start.ckpt is not None)
        self.oom = memory.Guard(device, model_cfg, cfg.batch_size, self.saved)
        self.tokens_per_iter = cfg.batch_size * cfg.grad_accum * model_cfg.block_size
        self.progress = Progress(cfg.max_iters, self.tokens_per_iter, enabled=ctx.is_main)
        self.amp_dtype, amp_words = ops.precision(device)
        memory.check_fits(device, model_cfg, cfg.batch_size, self.amp_dtype is not None,
                          cfg.optimizer)
        with self.oom("checking the Triton kernels"):
            self.backend, why = trust.choose(
                cfg, model_cfg, device, self.amp_dtype,
                start.ckpt.get("backend") if start.ckpt is not None else None, self.progress.say,
                stop.check)
        stop.check()
        self._build(start.corpus.ids)
        self.start_iter, self.best_val, self.skip_first_eval = restore(
            start, self.model, self.optimizer, self.batches, ctx)
        self.eval_model = torch.compile(self.model) if cfg.compile else self.model
        # A compiled model's kernels keep the thread count they were compiled with.
        tune = tune_threads and device.type == "cpu" and not cfg.compile
        self.step_threads, self.eval_threads = (threads.tuners(self.progress.message) if tune
                                                else (None, None))
        self.progress.message(start_line(start, ctx, device, self.model, self.optimizer, amp_words,
                                         self.step_threads, self.backend, why))
        self.run_id = (start.ckpt or {}).get("run") or uuid.uuid4().hex[:16]
        self.metrics = (Metrics(Path(cfg.out_dir), self.run_id, self._header(start, why),
                                start.ckpt["iteration"] if start.ckpt is not None else None,
                                self.progress.say, log)
                        if ctx.is_main and record else None)
        self.grad_norm: torch.Tensor | None = None  # before clipping, at the last log step
        self.t0 = time.perf_counter()
        with self.oom("trying a training step"):
            memory.try_step(self.eval_model, self.optimizer, cfg.batch_size,
                            model_cfg.block_size, device, self.autocast)
        self.step_model = distributed.wrap(self.eval_model, ctx, device)

    def _build(self, ids) -> None:
        """The data streams, the model with its stop checks, the optimizer and the loss scaler."""
        cfg, ctx, device = self.cfg, self.ctx, self.device
        self.streams = ctx.streams(cfg.grad_accum)  # the data streams of this rank's micro-batches
        self.batches = Batches(ids, self.model_cfg.block_size, cfg.batch_size, device, cfg.seed,
                               self.streams, cfg.split)
        self.stop.check()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        with self.oom("building the model"):
            self.model = build_model(self.model_cfg, self.backend).to(device)
        self.stop.check()
        # Within a step, checks between layers; not under DDP, whose ranks must finish a step
        # together, nor under torch.compile, which would trace them.
        self.checks_within_step = not ctx.enabled and not cfg.compile
        self.hooks = (checks_between_layers(self.model, self.stop.check)
                      if self.checks_within_step else [])
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout: a different stream on every rank

    def _header(self, start: Start, why: str) -> dict:
        """What the record's header says of the run besides its id."""
        device = self.device
        return {"started": metrics.now(), "command": sys.argv,
                "config": {"model": dataclasses.asdict(self.model_cfg),
                           "train": dataclasses.asdict(self.cfg)},
                "backend": self.backend, "backend_why": why, "processes": self.ctx.world_size,
                "device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                                       if device.type == "cuda" else cpu_words()),
                "versions": metrics.versions(), "git": metrics.git_commit(),
                "data": {**self.data, "tokenizer": self.cfg.tokenizer,
                         "tokens": len(start.corpus.ids), "vocab_size": start.corpus.vocab_size,
                         "split": self.cfg.split},
                "tokens_per_step": self.tokens_per_iter}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def loop(self) -> dict:
        """Train to max_iters or until a signal. A new run stopped before it has written
        anything (in its first evaluation, say) writes nothing and raises Stopped."""
        history: list[dict] = []
        t0 = self.t0 = time.perf_counter()
        it, stopped_by = self.start_iter, 0
        try:
            while True:
                evaluated = True  # whether iteration it's evaluation, if it has one, is done
                if self._evaluation_due(it):
                    with self.oom(f"evaluating at step {it}"):
                        entry, evaluated = self.evaluate(it, t0)
                    history += [entry] if entry is not None else []
                    stopped_by = distributed.agreed_signal(self.stop.signum, self.device)
                if stopped_by or it >= self.cfg.max_iters:
                    break
                with self.oom(f"training step {it + 1}"), threads.timed(self.step_threads):
                    loss = self.step(it)
                if loss is None:
                    stopped_by = self.stop.signum
                    break
                it, evaluated = it + 1, False
                stopped_by = self._after_step(it, loss)
                if stopped_by:
                    break
            if (stopped_by and it == self.start_iter  # rank 0 tells every rank whether it wrote
                    and not distributed.any_rank(self.saved.wrote, self.device)):
                raise Stopped(stopped_by)
            if stopped_by and (payload := self.checkpoint(it, evaluated)) is not None:
                self.saved.save("last.pt", payload)
                self._checkpointed()
        finally:
            for hook in self.hooks:
                hook.remove()
        return self.summary(it, time.perf_counter() - t0, history, stopped_by)

    def _evaluation_due(self, it: int) -> bool:
        due = it % self.cfg.eval_interval == 0 or it == self.cfg.max_iters
        return due and not (self.skip_first_eval and it == self.start_iter)

    def step(self, it: int) -> torch.Tensor | None:
        """One optimizer step over this rank's micro-batches; returns their mean loss. None if
        a stop request came in the middle (checks within steps only): the gradients dropped and
        the data and dropout streams put back, so that resuming takes this very step."""
        self.optimizer.schedule(it)
        total = torch.zeros((), device=self.device)
        before = streams.state(self.batches, self.device) if self.checks_within_step else None
        try:
            for m in self.streams:
                x, y = self.batches.get("train", stream=m)
                # all-reduce on the last micro-batch only
                with distributed.no_sync(self.step_model, m != self.streams[-1]):
                    with self.autocast():
                        _, loss = self.step_model(x, y)
                    self.scaler.scale(loss / len(self.streams)).backward()
                total += loss.detach()
        except Stopped:
            self.optimizer.zero_grad(set_to_none=True)
            streams.set_state(self.batches, self.device, before)
            return None
        logged = (it + 1) % self.log_interval == 0 or it + 1 == self.cfg.max_iters
        if self.cfg.grad_clip > 0:
            self.optimizer.unscale(self.scaler)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                            self.cfg.grad_clip)
        elif logged and self.metrics is not None:
            self.optimizer.unscale(self.scaler)
            self.grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step(self.scaler)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(self.streams)

    def _after_step(self, it: int, loss: torch.Tensor) -> int:
        """The loss on the progress line at log steps (a non-finite one ends the run); the signal
        that stops the run (0: none), agreed on by every rank, at log steps in a job."""
        at_log = it % self.log_interval == 0 or it == self.cfg.max_iters
        if at_log:
            loss_value = loss.item()
            if distributed.any_rank(not math.isfinite(loss_value), self.device):
                raise self._diverged(it)
            ms = self.progress.update(it, loss_value)
            if self.metrics is not None:
                self.metrics.add(self._step_record(it, loss_value, ms))
        if at_log or not self.ctx.enabled:
            return distributed.agreed_signal(self.stop.signum, self.device)
        return 0

    def _step_record(self, it: int, loss: float, ms: float | None) -> dict:
        norm = float(self.grad_norm) if self.grad_norm is not None else None
        record = {"kind": "step", "iter": it, "loss": loss,
                  "lr": {name: optimizer.param_groups[0]["lr"]
                         for name, optimizer in self.optimizer.parts.items()},
                  "grad_norm": norm,
                  "clipped": norm is not None and 0 < self.cfg.grad_clip < norm,
                  "ms_per_step": ms, "tokens_per_s": ms and self.tokens_per_iter / ms * 1000,
                  "elapsed": time.perf_counter() - self.t0}
        if self.device.type == "cpu":
            record["threads"] = torch.get_num_threads()
        elif self.device.type == "cuda":
            record["cuda_memory_mib"] = torch.cuda.memory_allocated(self.device) / 2**20
            record["cuda_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return record

    def _checkpointed(self) -> None:
        if self.metrics is not None:
            self.metrics.checkpointed()

    def evaluate(self, it: int, t0: float) -> tuple[dict | None, bool]:
        """Rank 0 measures both losses and writes the checkpoints; all ranks stop together if
        the loss diverged. Returns rank 0's history entry (None elsewhere) and whether the
        evaluation finished: a stop request cuts it short, the evaluation stream put back."""
        started = time.perf_counter()
        losses = self._losses(it) if self.ctx.is_main else None
        seconds = time.perf_counter() - started
        payload = self.checkpoint(it, evaluated=True)
        diverged = losses is not None and not all(map(math.isfinite, losses.values()))
        if distributed.any_rank(diverged, self.device):
            raise self._diverged(it)
        if losses is None:
            return None, not self.ctx.is_main
        improved = losses["val"] < self.best_val
        self.best_val = min(self.best_val, losses["val"])
        payload["best_val_loss"] = self.best_val
        self.progress.message(
            f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
            f"({bits(losses['val']):.3f} bits/{self.tokenizer.unit})"
            f"{' (best)' if improved else ''}")
        if self.metrics is not None:
            self.metrics.add({"kind": "eval", "iter": it, "train": losses["train"],
                              "val": losses["val"], "val_bits": bits(losses["val"]),
                              "best_val": self.best_val, "improved": improved,
                              "saved": ["best.pt", "last.pt"] if improved else ["last.pt"],
                              "eval_seconds": seconds, "elapsed": time.perf_counter() - self.t0})
        if improved:
            self.saved.save("best.pt", payload)
        self.saved.save("last.pt", payload)
        self._checkpointed()
        return {"iter": it, **losses, "seconds": time.perf_counter() - t0}, True

    def _losses(self, it: int) -> dict | None:
        """`estimate_loss` with progress and stop checks; None if a stop request cut it short."""
        before = self.batches.state()

        def before_batch(done: int, total: int) -> None:
            self.stop.check()
            self.progress.evaluating(it, done, total)

        try:
            with self.progress.excluded():
                return estimate_loss(self.eval_model, self.batches, self.cfg.eval_iters,
                                     self.autocast, before_batch,
                                     lambda: threads.timed(self.eval_threads))
        except Stopped:
            self.batches.load_state(before)
            return None

    def checkpoint(self, iteration: int, evaluated: bool) -> dict | None:
        """The checkpoint payload on rank 0 (None elsewhere); every rank must call this.
        `evaluated`: whether this iteration's evaluation (if it has one) is done."""
        rng = streams.gathered(self.batches, self.device)
        if not self.ctx.is_main:
            return None
        return {"model_config": dataclasses.asdict(self.model_cfg),
                "train_config": dataclasses.asdict(self.cfg), "model": self.model.state_dict(),
                "backend": self.backend, "optimizer": self.optimizer.state_dict(),
                "iteration": iteration, "evaluated": evaluated, "best_val_loss": self.best_val,
                "vocab": self.tokenizer.chars, "data": self.data, "rng": rng, "run": self.run_id}

    def summary(self, it: int, elapsed: float, history: list[dict], stopped_by: int) -> dict:
        steps = it - self.start_iter
        speed = steps * self.tokens_per_iter / elapsed if elapsed > 0 else 0.0
        final = history[-1]["val"] if history and history[-1]["iter"] == it else None
        record = (str(self.metrics.path) if self.metrics is not None and self.metrics.file
                  else None)
        self.progress.done(it, steps, elapsed, speed, final, self.best_val,
                           str(self.saved.out_dir), stopped_by, record)
        return {"iterations": it, "steps": steps, "seconds": elapsed, "tokens_per_second": speed,
                "best_val_loss": self.best_val, "history": history,
                "out_dir": str(self.saved.out_dir), "interrupted_by": stopped_by or None,
                "model": self.model,
                "threads": dict(self.step_threads.used) if self.step_threads else None}

    def _diverged(self, it: int) -> UserError:
        kept = (f"the last good checkpoint is kept in {self.saved.out_dir}/" if self.saved.wrote
                else "nothing was written")
        return UserError(f"loss is not finite at iteration {it}: training diverged; {kept} "
                         f"(try {lower_rates(self.cfg)})")

    def close(self) -> None:
        """Let go of the DDP wrapper, which must be gone before `distributed.stop()`; close the
        record."""
        self.step_model = self.eval_model
        if self.metrics is not None:
            self.metrics.close()
