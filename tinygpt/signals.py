"""Stopping on request: SIGINT (Ctrl-C), SIGTERM (a scheduler) and SIGHUP (a closed terminal)
become a flag that training checks often (between a model's layers, too) and answers by saving; a
second signal ends the process at once, even in the middle of a long operation. No torch here."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from .errors import Stopped

SIGNALS = [signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
REPEAT_S = 1.0  # a signal this soon after the first is the same request: torchrun passes its
#                 Ctrl-C on to workers that had it from the terminal already


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
        print(text, file=sys.stderr, flush=True)


class StopRequest:
    """While entered (in the main thread), the signals above set `signum` instead of ending the
    process; `check()` raises Stopped once one has come. Signals the process was started to
    ignore (nohup, a background job) stay ignored. A second signal, more than `REPEAT_S` after the
    first, is answered by a watcher thread that exits with 128 + its number at once: the Python
    handler alone would wait for a long-running operation to return."""

    def __init__(self, speak: bool = True):
        self.signum: int | None = None
        self.speak = speak
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_wakeup = -1
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may handle signals: leave them as they are
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)
        receive, send = self._wakeup = socket.socketpair()
        send.setblocking(False)
        self._previous_wakeup = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, args=(receive,), daemon=True,
                                         name="tinygpt-second-signal")
        self._watcher.start()
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            return  # the watcher answers a second signal
        self.signum = signum
        if self.speak:
            _say(f"\n{signal.Signals(signum).name} received: stopping at the next check and "
                 "saving (a second signal exits at once, without saving)")

    def _watch(self, receive: socket.socket) -> None:
        first = None
        while data := receive.recv(64):  # one byte per signal; empty once __exit__ closes
            for signum in data:
                if signum not in self._previous:
                    continue
                now = time.monotonic()
                if first is None:
                    first = now
                elif now - first > REPEAT_S:
                    if self.speak:
                        _say(f"\n{signal.Signals(signum).name} again: exiting now, without "
                             "saving; the checkpoints written before are intact")
                    os._exit(128 + signum)

    def check(self) -> None:
        """Raise Stopped if a signal has asked the run to stop."""
        if self.signum is not None:
            raise Stopped(self.signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            receive, send = self._wakeup
            send.close()  # wakes the watcher with an empty read
            self._watcher.join()
            receive.close()
            self._wakeup = self._watcher = None


def checks_between_layers(model, check: Callable[[], None]) -> list:
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
