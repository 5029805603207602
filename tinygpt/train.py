"""The training loop: optimizer steps (`tinygpt.optim`), periodic evaluation, checkpoints.

Checkpoints go to `out_dir`, which a run holds locked: `best.pt` whenever the validation loss
improves and `last.pt` at every evaluation, at the end and when a signal stops the run. `--resume`
continues from `last.pt` exactly: weights, optimizer, iteration, data file and every random stream
are restored (on another number of processes, all but the per-rank dropout streams).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import distributed, launch, memory, ops, trust
from .checkpoint import check_training_state, load_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig, from_preset, params_words, refuse_unused
from .data import SHAKESPEARE_SHA256, Batches, Tokenizer, default_corpus, read_corpus
from .errors import Stopped, UserError
from .model import LanguageModel, attention_shape, build_model
from .optim import make_optimizer
from .rundir import OutDirLock, existing_checkpoints
from .signals import StopRequest
from .threads import ThreadTuner, count_kept, describe

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


@torch.no_grad()
def estimate_loss(model, batches: Batches, eval_iters: int, autocast,
                  before_batch=lambda done, total: None,
                  timed=contextlib.nullcontext) -> dict[str, float]:
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


class Progress:
    """One self-rewriting status line on a terminal, a line per update otherwise; silent when
    not `enabled` (every rank but the first)."""

    def __init__(self, total: int, tokens_per_iter: int, enabled: bool = True):
        self.total, self.tokens_per_iter, self.enabled = total, tokens_per_iter, enabled
        self.tty = sys.stderr.isatty()
        self.t_last, self.it_last = time.perf_counter(), None
        self.width = 0
        self.eval_started = self.eval_shown = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` spent on other work (an evaluation) out of the next ms/iter."""
        self.t_last += seconds

    def _status(self, line: str) -> None:
        """`line` as the status line of a terminal, or as a line of its own elsewhere."""
        if self.tty:
            self._write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self._write(line + "\n")

    def _write(self, text: str) -> None:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except OSError:  # the terminal is gone (SIGHUP): train on without a display
            self.enabled = False

    def update(self, it: int, loss: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.it_last is not None and it > self.it_last:
            ms = 1000 * (now - self.t_last) / (it - self.it_last)
            speed = f"{ms:.1f} ms/iter | {self.tokens_per_iter / ms * 1000:,.0f} tok/s"
        else:
            speed = "ms/iter from the next report"
        self.t_last, self.it_last = now, it
        done = int(20 * it / max(1, self.total))
        self._status(f"[{'#' * done}{'.' * (20 - done)}] {it}/{self.total} loss {loss:.4f} | "
                     f"{speed}")

    def evaluating(self, it: int, done: int, total: int) -> None:
        """Progress through a long evaluation: at most once a second on a terminal and once every
        30 s elsewhere, so that a short one shows nothing."""
        now = time.perf_counter()
        if done == 0:
            self.eval_started = self.eval_shown = now
        if not self.enabled or now - self.eval_shown < (1 if self.tty else 30):
            return
        self.eval_shown = now
        self._status(f"evaluating step {it}: batch {done}/{total} "
                     f"({now - self.eval_started:.0f} s)")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty and self.width:
            self._write("\r" + " " * self.width + "\r")
            self.width = 0
        self._write(text + "\n")


def _load_corpus(data: str | None, ckpt: dict | None, ckpt_path: Path | None,
                 new_data: bool) -> tuple[str, dict]:
    """The text to train on and its record for checkpoints ({path, sha256}): --data FILE, else
    the file a resumed run's checkpoint names, else tiny Shakespeare. A resumed run refuses a text
    other than its own unless `new_data`."""
    recorded = ckpt.get("data") if ckpt is not None else None
    if data is not None:
        path = Path(data)
    elif recorded is not None and os.path.isfile(recorded["path"]):
        path = Path(recorded["path"])
    elif recorded is not None and recorded["sha256"] != SHAKESPEARE_SHA256:
        raise UserError(f"{ckpt_path} was trained on {recorded['path']}, which is not there any "
                        "more; pass that text with --data FILE")
    else:  # a new run without --data, or one on tiny Shakespeare (downloaded again if need be)
        path = default_corpus()
    text, sha256 = read_corpus(path)
    record = {"path": str(path.resolve()), "sha256": sha256}
    if recorded is not None and record["sha256"] != recorded["sha256"] and not new_data:
        raise UserError(f"{path} is not the text {ckpt_path} was trained on ({recorded['path']}, "
                        f"sha256 {recorded['sha256'][:12]}...); resume on that text, or pass "
                        "--new-data to go on with this one")
    return text, record


def _resume_configs(ckpt: dict, overrides: dict) -> tuple[ModelConfig, TrainConfig]:
    """The checkpoint's configs; training fields may be overridden, model fields and the
    optimizer (whose state would not carry over) must agree."""
    model_cfg = ModelConfig(**ckpt["model_config"])
    train_cfg = TrainConfig(**ckpt["train_config"])
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, value in overrides.items():
        if name in model_names and value is not None and getattr(model_cfg, name) != value:
            raise UserError(
                f"--{name.replace('_', '-')} {value} differs from the checkpoint's "
                f"{getattr(model_cfg, name)}; a resumed run keeps the model it was started with"
            )
    if overrides.get("optimizer") not in (None, train_cfg.optimizer):
        raise UserError(f"--optimizer {overrides['optimizer']} differs from the checkpoint's "
                        f"{train_cfg.optimizer}; a resumed run keeps the optimizer it was started "
                        "with, whose state it goes on from")
    train_overrides = {k: v for k, v in overrides.items()
                       if k not in model_names and v is not None}
    refuse_unused(model_cfg.model, train_cfg.optimizer, train_overrides)
    train_cfg = TrainConfig(**{**ckpt["train_config"], **train_overrides})
    train_cfg.validate()
    return model_cfg, train_cfg


def train(preset: str = "shakespeare-char", overrides: dict | None = None, data: str | None = None,
          resume: bool = False, log_interval: int = 10, overwrite: bool = False,
          new_data: bool = False, tune_threads: bool = False,
          join_timeout: float = launch.JOIN_TIMEOUT_S) -> dict:
    """Train a model; returns a summary: losses, timings, checkpoint paths and the model.

    The run holds `out_dir` locked. A new run refuses an out_dir that holds another run's
    checkpoints unless `overwrite`; a resumed one trains on the data file its checkpoint names
    unless given `data` (a different text needs `new_data`). SIGINT, SIGTERM and SIGHUP stop it
    with `last.pt` saved (Stopped is raised if one comes before the first step).

    With `tune_threads`, a run on the CPU (not compiled) chooses its thread counts for training
    steps and for evaluation by timing them (`tinygpt.threads`); otherwise torch's count stands.

    Under torchrun every process runs this: data parallel, rank 0 evaluates and checkpoints;
    the processes give up on each other after `join_timeout` seconds if one does not start.
    Without a `grad_accum` override a new run gives every process the preset's micro-batches
    (the global batch grows with the processes); with one, they share its micro-batches out.
    """
    overrides = dict(overrides or {})
    ctx = launch.from_environment()
    out_dir = Path(overrides.get("out_dir") or TrainConfig.out_dir)
    if not resume:
        model_cfg, cfg = from_preset(preset, **overrides)  # bad options fail before any I/O
    # Rank 0 writes the checkpoints, so it holds the directory.
    with OutDirLock(out_dir) if ctx.is_main else contextlib.nullcontext(), \
            StopRequest(speak=ctx.is_main) as stop, count_kept():
        ckpt = ckpt_path = None
        replacing = []
        if resume:
            ckpt_path = out_dir / "last.pt"
            ckpt = load_checkpoint(ckpt_path)
        elif ctx.is_main and (replacing := existing_checkpoints(out_dir)) and not overwrite:
            raise UserError(f"{out_dir}/ already holds a run ({', '.join(replacing)}); continue "
                            "it with --resume, or pass --overwrite or another --out-dir")
        text, data = _load_corpus(data, ckpt, ckpt_path, new_data)
        tokenizer = Tokenizer.from_text(text)
        if ckpt is not None:
            if ckpt["vocab"] != tokenizer.chars:
                raise UserError(
                    f"{data['path']} has a different vocabulary ({tokenizer.vocab_size} "
                    f"characters) from the checkpoint's ({len(ckpt['vocab'])}); resume with the "
                    "same data")
            model_cfg, cfg = _resume_configs(ckpt, overrides)
        else:
            model_cfg.vocab_size = tokenizer.vocab_size
        if ckpt is None and overrides.get("grad_accum") is None:
            cfg.grad_accum *= ctx.world_size  # the preset's micro-batches on every process
        if cfg.grad_accum % ctx.world_size:
            raise UserError(f"grad_accum ({cfg.grad_accum}) must be a multiple of the number of "
                            f"processes ({ctx.world_size}), which share its micro-batches out")
        device = pick_device(cfg.device, ctx.local_rank if ctx.enabled else None)
        stop.check()
        distributed.start(ctx, device, join_timeout)
        run = None
        try:
            run = _Run(ctx, device, model_cfg, cfg, text, data, tokenizer, ckpt, ckpt_path,
                       log_interval, stop, preset if ckpt is None else None, tune_threads)
            return run.loop(replacing if overwrite else [])
        except BaseException as error:
            if ctx.enabled:
                distributed.clear_frames(error)
            raise
        finally:
            if run is not None:
                run.close()  # the DDP wrapper goes before the process group it holds
            distributed.stop()


class _Run:
    """One training run's state: model, optimizer, data streams, and the loop over steps."""

    def __init__(self, ctx, device, model_cfg, cfg, text, data, tokenizer, ckpt, ckpt_path,
                 log_interval, stop, preset, tune_threads):
        self.ctx, self.device, self.model_cfg, self.cfg = ctx, device, model_cfg, cfg
        self.tokenizer, self.log_interval = tokenizer, log_interval
        self.data, self.stop = data, stop  # the corpus record for checkpoints; the StopRequest
        self.out_dir = Path(cfg.out_dir)
        self.wrote = ckpt is not None  # whether out_dir holds this run's checkpoints
        self.replacing: list[str] = []  # an earlier run's, removed at the first write (_save)
        self.oom_advice = memory.advice(model_cfg, cfg.batch_size)  # for every step's guard
        self.amp_dtype, amp_words = ops.precision(device)
        memory.check_fits(device, model_cfg, cfg.batch_size, len(text), self.amp_dtype is not None,
                          cfg.optimizer)
        self.backend, why = self._choose_backend(ckpt)
        stop.check()
        # Micro-batch m of every step comes from data stream m; rank r owns a contiguous share of
        # the streams, so the global batch does not depend on the number of processes.
        per_rank = cfg.grad_accum // ctx.world_size
        self.streams = range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
        with self._out_of_memory_reported("copying the corpus to it"):
            self.batches = Batches(text, tokenizer, model_cfg.block_size, cfg.batch_size, device,
                                   cfg.seed, self.streams)
        stop.check()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        with self._out_of_memory_reported("building the model"):
            self.model = build_model(model_cfg, self.backend).to(device)
        stop.check()
        # Within a step, checks between layers; not under DDP, whose ranks must finish a step
        # together, nor under torch.compile, which would trace them.
        self.checks_within_step = not ctx.enabled and not cfg.compile
        self.hooks = _checks_between_layers(self.model, stop.check) if self.checks_within_step \
            else []
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout: a different stream on every rank
        self.start_iter, self.best_val = 0, math.inf
        self.skip_first_eval = False  # a resumed run's first evaluation may be done already
        if ckpt is not None:
            self._restore(ckpt, ckpt_path)
        self.eval_model = torch.compile(self.model) if cfg.compile else self.model
        self.tokens_per_iter = cfg.batch_size * cfg.grad_accum * model_cfg.block_size
        self.progress = Progress(cfg.max_iters, self.tokens_per_iter, enabled=ctx.is_main)
        # Training steps and evaluation batches each get their thread count; a compiled model's
        # kernels keep the count they were compiled with.
        self.step_threads = self.eval_threads = None
        if tune_threads and device.type == "cpu" and not cfg.compile:
            self.step_threads, self.eval_threads = (
                ThreadTuner(what, unit, torch.get_num_threads(), say=self.progress.message)
                for what, unit in (("training", "step"), ("evaluation", "batch")))
        if device.type == "cpu":
            amp_words += ", " + describe(self.step_threads)
        self.progress.message(
            "tinygpt: " + (f"preset {preset}" if ckpt is None else
                           f"resuming {ckpt_path} at iteration {self.start_iter}")
            + f" | {model_cfg.model} {params_words(self.model.num_params())} | data "
            f"{data['path']} ({len(text):,} chars, vocab {tokenizer.vocab_size}) | device {device} "
            f"({amp_words}) | backend {self.backend}{' + compile' if cfg.compile else ''}"
            + (f" ({why})" if why else "")
            + (f" | {ctx.world_size} processes x {per_rank} micro-batch"
               f"{'es' if per_rank > 1 else ''} of {cfg.batch_size} (global batch "
               f"{cfg.batch_size * cfg.grad_accum})" if ctx.enabled else "")
            + f" | {cfg.max_iters} steps, {_rates(cfg)} (warm-up {cfg.warmup_iters}, cosine to "
            f"{cfg.min_lr / cfg.lr:.3g}x at step {cfg.lr_decay_iters})")
        with self._out_of_memory_reported("trying a training step"):
            self._try_step()
        self.step_model = self.eval_model
        if ctx.enabled:
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.eval_model, device_ids=[device.index] if device.type == "cuda" else None)

    def _say(self, text: str) -> None:
        if self.ctx.is_main:
            print(f"tinygpt: {text}", file=sys.stderr, flush=True)

    def _choose_backend(self, ckpt: dict | None) -> tuple[str, str]:
        """The backend this run takes and why (for the start line). A resumed run under `auto`
        keeps its checkpoint's, where it can run here, so that it goes on bit for bit; triton is
        checked on the GPU first, and a new `auto` run takes it only where it times faster than
        torch (`tinygpt.trust`)."""
        cfg, device = self.cfg, self.device
        shape = attention_shape(self.model_cfg, cfg.batch_size)
        request = ops.requested_backend(cfg.backend)[0]
        previous = ckpt.get("backend") if ckpt is not None and request == "auto" else None
        resolved = None
        if previous is not None:
            try:
                resolved = ops.resolve_backend(previous, device, shape)
            except UserError as e:
                self._say(f"the checkpoint was trained on the {previous} backend, which cannot "
                          f"run here ({e}); choosing again")
        kept = resolved is not None
        resolved = resolved or ops.resolve_backend(cfg.backend, device, shape)
        if cfg.compile and resolved == "triton" and device.type != "cuda":
            raise UserError("--compile with the triton backend needs CUDA: the Triton interpreter "
                            "cannot be traced")
        with self._out_of_memory_reported("checking the Triton kernels"):
            choice = trust.settle(resolved, device, self.model_cfg, cfg.batch_size,
                                  self.amp_dtype, cfg.compile, explicit=request == "triton",
                                  by_speed=request == "auto" and not kept, say=self._say,
                                  between=self.stop.check)
        choice = trust.agree(choice, resolved, device)
        why = "; ".join(w for w in ("kept from the checkpoint" if kept else "", choice.why) if w)
        return choice.backend, why

    def close(self) -> None:
        """Let go of the DDP wrapper, which must be gone before `distributed.stop()`."""
        self.step_model = self.eval_model

    def _out_of_memory_reported(self, doing: str):
        kept = (f"the checkpoints in {self.out_dir}/ are kept" if self.wrote
                else "nothing was written")
        return memory.reported(self.device, doing, self.oom_advice, kept)

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
        """Everything is checked against what it goes into before any of it is loaded."""
        check_training_state(ckpt, path, self.optimizer, self.device)
        self.model.load_state_dict(ckpt["model"])  # checked by load_checkpoint
        self.optimizer.load_state(ckpt["optimizer"])
        self.start_iter, self.best_val = ckpt["iteration"], float(ckpt["best_val_loss"])
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
            "backend": self.backend,
            "optimizer": self.optimizer.state_dict(),
            "iteration": iteration,
            "evaluated": evaluated,
            "best_val_loss": self.best_val,
            "vocab": self.tokenizer.chars,
            "data": self.data,
            "rng": {"torch": torch_states, "cuda": cuda_states if cuda else None,
                    "batches": Batches.merge_states(batch_states)},
        }

    def evaluate(self, it: int, t0: float) -> tuple[dict | None, bool]:
        """Rank 0 measures both losses and writes the checkpoints; all ranks stop together if
        the loss diverged. Returns rank 0's history entry (None elsewhere) and whether the
        evaluation finished: a stop request cuts it short, the evaluation stream put back."""
        losses = None
        if self.ctx.is_main:
            before = self.batches.state()

            def before_batch(done: int, total: int) -> None:
                self.stop.check()
                self.progress.evaluating(it, done, total)

            started = time.perf_counter()
            timed = self.eval_threads.timed if self.eval_threads else contextlib.nullcontext
            try:
                losses = estimate_loss(self.eval_model, self.batches, self.cfg.eval_iters,
                                       self.autocast, before_batch, timed)
            except Stopped:
                self.batches.load_state(before)
            self.progress.exclude(time.perf_counter() - started)
        payload = self.checkpoint(it, evaluated=True)
        diverged = losses is not None and not all(map(math.isfinite, losses.values()))
        if distributed.any_rank(diverged, self.device):
            raise UserError(_diverged_message(it, self.out_dir, self.cfg, self.wrote))
        if losses is None:
            return None, not self.ctx.is_main
        improved = losses["val"] < self.best_val
        self.best_val = min(self.best_val, losses["val"])
        payload["best_val_loss"] = self.best_val
        self.progress.message(f"step {it}: train loss {losses['train']:.4f}, "
                              f"val loss {losses['val']:.4f}{' (best)' if improved else ''}")
        if improved:
            self._save("best.pt", payload)
        self._save("last.pt", payload)
        return {"iter": it, **losses, "seconds": time.perf_counter() - t0}, True

    def _random_state(self) -> tuple:
        cuda = self.device.type == "cuda"
        return (self.batches.state(), torch.get_rng_state(),
                torch.cuda.get_rng_state(self.device) if cuda else None)

    def _set_random_state(self, state: tuple) -> None:
        batches, cpu, cuda = state
        self.batches.load_state(batches)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def step(self, it: int) -> torch.Tensor | None:
        """One optimizer step over this rank's micro-batches; returns their mean loss. None if
        a stop request came in the middle (checks within steps only): the gradients dropped and
        the data and dropout streams put back, so that resuming takes this very step."""
        self.optimizer.schedule(it)
        total = torch.zeros((), device=self.device)
        before = self._random_state() if self.checks_within_step else None
        try:
            for m in self.streams:
                x, y = self.batches.get("train", stream=m)
                last = m == self.streams[-1]
                skip_sync = self.ctx.enabled and not last  # all-reduce on the last one only
                with self.step_model.no_sync() if skip_sync else contextlib.nullcontext():
                    with self.autocast():
                        _, loss = self.step_model(x, y)
                    self.scaler.scale(loss / len(self.streams)).backward()
                total += loss.detach()
        except Stopped:
            self.optimizer.zero_grad(set_to_none=True)
            self._set_random_state(before)
            return None
        if self.cfg.grad_clip > 0:
            self.optimizer.unscale(self.scaler)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step(self.scaler)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(self.streams)

    def _timed(self):
        """A training step's timing for the thread count, when the run chooses it."""
        return self.step_threads.timed() if self.step_threads else contextlib.nullcontext()

    def _evaluation_due(self, it: int) -> bool:
        due = it % self.cfg.eval_interval == 0 or it == self.cfg.max_iters
        return due and not (self.skip_first_eval and it == self.start_iter)

    def _agreed_stop(self) -> int:
        """The signal that stops the run, agreed on by every rank (0: none)."""
        return int(distributed.max_over_ranks(self.stop.signum or 0, self.device))

    def _save(self, name: str, payload: dict) -> None:
        """Write checkpoint `name`; the first write removes an earlier run's (--overwrite), so
        that the directory never holds checkpoints of both."""
        for old in self.replacing:
            (self.out_dir / old).unlink(missing_ok=True)
        self.replacing = []
        save_checkpoint(self.out_dir / name, payload)
        self.wrote = True

    def loop(self, replacing: list[str]) -> dict:
        """Train to max_iters or until a signal; `replacing`: the checkpoints of an earlier run
        that --overwrite removes when this one first writes. A new run stopped before it has
        written anything (in its first evaluation, say) writes nothing and raises Stopped."""
        cfg = self.cfg
        history: list[dict] = []
        t0 = time.perf_counter()
        it, stopped_by = self.start_iter, 0
        self.replacing = replacing
        try:
            while True:
                evaluated = True  # whether iteration it's evaluation, if it has one, is done
                if self._evaluation_due(it):
                    with self._out_of_memory_reported(f"evaluating at step {it}"):
                        entry, evaluated = self.evaluate(it, t0)
                    if entry is not None:
                        history.append(entry)
                    stopped_by = self._agreed_stop()
                if stopped_by or it >= cfg.max_iters:
                    break
                with self._out_of_memory_reported(f"training step {it + 1}"), self._timed():
                    loss = self.step(it)
                if loss is None:
                    stopped_by = self.stop.signum
                    break
                it, evaluated = it + 1, False
                at_log = it % self.log_interval == 0 or it == cfg.max_iters
                if at_log:
                    loss_value = loss.item()
                    if distributed.any_rank(not math.isfinite(loss_value), self.device):
                        raise UserError(_diverged_message(it, self.out_dir, cfg, self.wrote))
                    self.progress.update(it, loss_value)
                if at_log or not self.ctx.enabled:  # ranks agree on stopping at log steps
                    stopped_by = self._agreed_stop()
                if stopped_by:
                    break
            if (stopped_by and it == self.start_iter  # rank 0 tells every rank whether it wrote
                    and not distributed.any_rank(self.wrote, self.device)):
                raise Stopped(stopped_by)
            if stopped_by:
                payload = self.checkpoint(it, evaluated)
                if payload is not None:
                    self._save("last.pt", payload)
        finally:
            for hook in self.hooks:
                hook.remove()
        return self.summary(it, time.perf_counter() - t0, history, stopped_by)

    def summary(self, it: int, elapsed: float, history: list[dict], stopped_by: int) -> dict:
        steps = it - self.start_iter
        summary = {
            "iterations": it, "steps": steps, "seconds": elapsed,
            "tokens_per_second": steps * self.tokens_per_iter / elapsed if elapsed > 0 else 0.0,
            "best_val_loss": self.best_val, "history": history, "out_dir": str(self.out_dir),
            "interrupted_by": stopped_by or None, "model": self.model,
            "threads": dict(self.step_threads.used) if self.step_threads else None,
        }
        final = history[-1] if history else None
        self.progress.message(
            f"done: {steps} steps in {elapsed:.1f}s ({summary['tokens_per_second']:,.0f} tok/s)"
            + (f" | final val loss {final['val']:.4f}" if final and final["iter"] == it else "")
            + (f" | best val loss {self.best_val:.4f}" if math.isfinite(self.best_val) else "")
            + f" | checkpoints in {self.out_dir}/"
            + (f" | stopped by {signal.Signals(stopped_by).name} at iteration {it}; "
               f"continue with --resume" if stopped_by else ""))
        return summary


def _checks_between_layers(model: LanguageModel, check) -> list:
    """Call `check` before each attention and MLP of `model`'s blocks, in the forward pass and
    where the backward pass reaches them, so that a stop request is seen within a layer's time
    at any model size. Returns the hooks' handles."""
    def before(module, args):
        check()

    def after(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda grad: check())

    handles = []
    for block in getattr(model, "blocks", ()):
        for part in (block.attn, block.mlp):
            handles += [part.register_forward_pre_hook(before), part.register_forward_hook(after)]
    return handles


def _rates(cfg: TrainConfig) -> str:
    """The peak learning rates, as the start line shows them."""
    if cfg.optimizer == "muon":
        return f"muon lr {cfg.muon_lr:g} + adamw lr {cfg.lr:g}"
    return f"adamw lr {cfg.lr:g}"


def _diverged_message(it: int, out_dir: Path, cfg: TrainConfig, wrote: bool) -> str:
    kept = (f"the last good checkpoint is kept in {out_dir}/" if wrote
            else "nothing was written")
    lower = f"--lr below {cfg.lr:g}"
    if cfg.optimizer == "muon":
        lower += f" or --muon-lr below {cfg.muon_lr:g}"
    return f"loss is not finite at iteration {it}: training diverged; {kept} (try {lower})"
