"""The progress line of a training run: steps, loss, ms/iter and tokens per second, on one
self-rewriting line on a terminal and a line per report elsewhere."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time

from .config import params_words
from .launch import Context
from .model import LanguageModel
from .optim import Optimizers
from .optim import describe as describe_optimizers
from .start import Start
from .threads import ThreadTuner, describe


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

    @contextlib.contextmanager
    def excluded(self):
        """Leave the time spent within out of the next ms/iter."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.exclude(time.perf_counter() - started)

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

    def update(self, it: int, loss: float) -> float | None:
        """The status line at step `it`; returns the ms a step took since the last update (None
        at the first)."""
        now = time.perf_counter()
        ms = (1000 * (now - self.t_last) / (it - self.it_last)
              if self.it_last is not None and it > self.it_last else None)
        self.t_last, self.it_last = now, it
        if not self.enabled:
            return ms
        speed = ("ms/iter from the next report" if ms is None else
                 f"{ms:.1f} ms/iter | {self.tokens_per_iter / ms * 1000:,.0f} tok/s")
        done = int(20 * it / max(1, self.total))
        self._status(f"[{'#' * done}{'.' * (20 - done)}] {it}/{self.total} loss {loss:.4f} | "
                     f"{speed}")
        return ms

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

    def say(self, text: str) -> None:
        """A line of tinygpt's own: a choice it made, a check it ran."""
        self.message(f"tinygpt: {text}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty and self.width:
            self._write("\r" + " " * self.width + "\r")
            self.width = 0
        self._write(text + "\n")

    def done(self, it: int, steps: int, elapsed: float, tokens_per_second: float,
             final_val: float | None, best_val: float, out_dir: str, stopped_by: int,
             record: str | None = None) -> None:
        """The run's last line: its steps and speed, losses, checkpoints, and what stopped it."""
        self.message(
            f"done: {steps} steps in {elapsed:.1f}s ({tokens_per_second:,.0f} tok/s)"
            + (f" | final val loss {final_val:.4f}" if final_val is not None else "")
            + (f" | best val loss {best_val:.4f}" if math.isfinite(best_val) else "")
            + f" | checkpoints in {out_dir}/"
            + (f" | record in {record}: tinygpt plot {out_dir}" if record else "")
            + (f" | stopped by {signal.Signals(stopped_by).name} at iteration {it}; "
               f"continue with --resume" if stopped_by else ""))


def start_line(start: Start, ctx: Context, device, model: LanguageModel, optimizers: Optimizers,
               amp_words: str, threads: ThreadTuner | None, backend: str, why: str) -> str:
    """A run's first line: what it trains on what, where (with `threads` on the CPU), on which
    backend, with which optimizers, and for how long."""
    cfg, model_cfg = start.cfg, start.model_cfg
    tokens = cfg.batch_size * cfg.grad_accum // ctx.world_size * model_cfg.block_size  # a rank's
    if device.type == "cpu":
        amp_words += ", " + describe(threads)
    per_rank = cfg.grad_accum // ctx.world_size
    return (
        "tinygpt: " + (f"preset {start.preset}" if start.ckpt is None else
                       f"resuming {start.ckpt_path} at iteration {start.ckpt['iteration']}")
        + f" | {model_cfg.model} {params_words(model.num_params())} | data {start.data['path']} "
        f"({len(start.corpus.ids):,} {start.tokenizer.unit}s, vocab "
        f"{start.tokenizer.vocab_size}) | device {device} "
        f"({amp_words}) | backend {backend}{' + compile' if cfg.compile else ''}"
        + (f" ({why})" if why else "")
        + (f" | {ctx.world_size} processes x {per_rank} micro-batch"
           f"{'es' if per_rank > 1 else ''} of {cfg.batch_size} (global batch "
           f"{cfg.batch_size * cfg.grad_accum})" if ctx.enabled else "")
        + f" | {cfg.max_iters} steps, {describe_optimizers(optimizers, model, tokens)} "
        f"(warm-up {cfg.warmup_iters}, {cfg.lr_decay} to {cfg.min_lr / cfg.lr:.3g}x at step "
        f"{cfg.lr_decay_iters})")

