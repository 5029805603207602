"""CPU threads chosen by timing the work itself, at no cost to reproducibility.

torch's OpenMP threads spin while they wait for each other, so when another process takes one of
the cores, each parallel region waits for a thread that is not running: on two cores with one of
them busy, a cpu-baby step takes ten times longer on 2 threads than on 1, while on an idle machine
2 threads are the fastest. `ThreadTuner` times the units of work it is given (training steps,
evaluation batches, generated tokens) at each candidate count, keeps the fastest, and checks
again: at once when the current count slows down, otherwise within 2% of the units and 2% of the
time.

The count never changes a result. `reproducible_blas` puts MKL's matrix products in strict CNR
mode, bitwise the same at any thread count on AVX2 and AVX-512 CPUs, and the torch backend's CPU
LayerNorm reduces its gain and bias gradients without splitting rows between threads
(`tinygpt.ops.add_layer_norm`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from typing import Callable

PROBE_UNITS = 3  # a count is judged on at least this many units,
PROBE_SECONDS = 0.05  # lasting at least this long: a few of the scheduler's time slices
SHARE = 0.02  # the most of all units, and of all time, that re-checks may take
SLOWER = 1.5  # the current count's recent mean over its baseline that calls for a re-check
BETTER = 0.95  # a candidate takes over only when at least 5% faster
HOPELESS = 3.0  # a probe unit this many times the current count's mean ends the probe
THREAD_VARIABLES = ("OMP_", "GOMP_", "KMP_", "MKL_")


def reproducible_blas(environ=os.environ) -> None:
    """Ask MKL for results that do not depend on the thread count. MKL reads the variable at its
    first call, so this must come before torch multiplies matrices; a user's own setting stands."""
    environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def fixed_by(environ=os.environ) -> str | None:
    """The environment variable that fixes how torch's threads run (the user's, or torchrun's
    OMP_NUM_THREADS), or None. MKL_CBWR counts only when it lacks strict mode, since without it
    the thread count changes MKL's results."""
    for name, value in environ.items():
        if name == "MKL_CBWR" and "STRICT" in value.upper():
            continue
        if name.startswith(THREAD_VARIABLES):
            return name
    return None


@contextlib.contextmanager
def count_kept():
    """torch's thread count after the body is what it was before (a tuner changes it)."""
    import torch

    found = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(found)


def usable_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def candidates(cores: int, usual: int | None = None) -> list[int]:
    """Thread counts worth timing on `cores` cores, most first: all of them, one left to other
    work, half, one, and torch's `usual` count (its default: a thread per physical core)."""
    return sorted({cores, cores - 1, cores // 2, 1, usual or 1} - {0}, reverse=True)


def plural(threads: int) -> str:
    return f"{threads} thread{'s' if threads != 1 else ''}"



def describe(tuner: ThreadTuner | None) -> str:
    """The CPU threads torch uses, or those `tuner` chooses among by timing (for start lines)."""
    if tuner is None:
        import torch

        return plural(torch.get_num_threads())
    *more, fewest = map(str, tuner.counts)
    if not more:
        return plural(tuner.counts[0])
    return (f"{', '.join(more)} or {fewest} threads, whichever times faster (--threads N fixes "
            "the count)")

def tuners(say: Callable[[str], None]) -> tuple[ThreadTuner, ThreadTuner]:
    """A run's tuners for its training steps and its evaluation batches, each starting from
    torch's count: the two differ in work per call, so each gets its own count."""
    import torch

    return tuple(ThreadTuner(what, unit, torch.get_num_threads(), say=say)
                 for what, unit in (("training", "step"), ("evaluation", "batch")))


def timed(tuner: ThreadTuner | None):
    """`tuner.timed()`, or nothing to time without a tuner."""
    return tuner.timed() if tuner is not None else contextlib.nullcontext()


class Window:
    """The latest units timed at one count: at least `PROBE_UNITS` of them, and as few more as
    it takes to last `PROBE_SECONDS`. A descheduled thread costs a time slice now and then, not
    every unit, so a count is judged by its mean, not its median."""

    def __init__(self, seconds: list[float] = ()):
        self.units: collections.deque[float] = collections.deque()
        self.total = 0.0
        for s in seconds:
            self.add(s)

    def add(self, seconds: float) -> None:
        self.units.append(seconds)
        self.total += seconds
        while (len(self.units) > PROBE_UNITS
               and self.total - self.units[0] >= PROBE_SECONDS):
            self.total -= self.units.popleft()

    def full(self) -> bool:
        return len(self.units) >= PROBE_UNITS and self.total >= PROBE_SECONDS

    def mean(self) -> float:
        return self.total / len(self.units)


class ThreadTuner:
    """The fastest thread count for one kind of unit of work, found by timing units at each
    candidate count (`begin`/`end`, `timed`, or `tick` between consecutive units), starting
    from `start` threads (torch's count when the run begins).

    The first unit only warms up. The next `Window` of units sets the current count's baseline,
    then each other candidate is timed for a window. After that a candidate is timed again in turn
    while re-checks have taken under `SHARE` of the units and of the time, and all of them at once
    when the current count's latest window has a mean `SLOWER` times its baseline. A probe unit
    `HOPELESS` times the current count's mean ends its probe. `say` hears each change.
    """

    def __init__(self, what: str, unit: str, start: int | None = None, cores: int | None = None,
                 say: Callable[[str], None] | None = None,
                 set_threads: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.what, self.unit = what, unit  # for `say`: "training", "step"
        self.say, self.set_threads, self.clock = say, set_threads, clock
        self.counts = candidates(cores or usable_cores(), start)
        self.current = start or self.counts[0]
        self.applied: int | None = None  # the count last given to set_threads
        self.recent = Window()  # at the current count
        self.baseline: float | None = None
        self.queue: list[int] = []  # counts still to probe in this round
        self.probing: int | None = None
        self.samples = Window()  # at `probing`
        self.results: dict[int, Window] = {}  # this round's
        self.turn = 0  # which other count the next periodic re-check times
        self.units = self.probe_units = 0
        self.seconds = self.probe_seconds = 0.0  # probe_seconds: beyond the current count's time
        self.started: float | None = None
        self.warm = False
        self.used: collections.Counter[int] = collections.Counter()  # units run per count

    def begin(self) -> None:
        """Set the thread count for the unit that starts now."""
        threads = self.probing or self.current
        if threads != self.applied:
            self.set_threads(threads)
            self.applied = threads
        self.started = self.clock()

    def end(self) -> None:
        """The unit begun last is over (no-op when none is under way)."""
        if self.started is None:
            return
        seconds, self.started = self.clock() - self.started, None
        self.used[self.applied] += 1
        if not self.warm:  # first use: allocations and thread start-up
            self.warm = True
            return
        self.units += 1
        self.seconds += seconds
        if self.probing is None:
            self._steady(seconds)
        else:
            self._probe(seconds)

    def tick(self) -> None:
        """End the current unit, if any, and begin the next."""
        self.end()
        self.begin()

    @contextlib.contextmanager
    def timed(self):
        """Time the body as one unit (an exception leaves it untimed)."""
        self.begin()
        try:
            yield
        except BaseException:
            self.started = None
            raise
        self.end()

    def _steady(self, seconds: float) -> None:
        self.recent.add(seconds)
        if not self.recent.full() or len(self.counts) == 1:
            return
        others = [c for c in self.counts if c != self.current]
        if self.baseline is None or self.recent.mean() > SLOWER * self.baseline:
            # the current count's first measure, or something else took the cores: time them all
            self.baseline = self.recent.mean()
            self._start_round(others)
        elif (self.probe_units + len(self.recent.units) <= SHARE * self.units
              and self.probe_seconds <= SHARE * self.seconds):
            self.turn = (self.turn + 1) % len(others)
            self._start_round([others[self.turn]])

    def _start_round(self, counts: list[int]) -> None:
        self.queue, self.results = counts[1:], {}
        self.probing, self.samples = counts[0], Window()

    def _probe(self, seconds: float) -> None:
        reference = self.recent.mean()
        self.probe_units += 1
        self.probe_seconds += max(0.0, seconds - reference)
        self.samples.add(seconds)
        if not self.samples.full() and seconds < HOPELESS * reference:
            return
        self.results[self.probing] = self.samples
        if self.queue:
            self.probing, self.samples = self.queue.pop(0), Window()
            return
        self.probing = None
        best = min(self.results, key=lambda c: self.results[c].mean())
        fastest = self.results[best].mean()
        if fastest < BETTER * reference:
            if self.say is not None:
                self.say(f"{self.what} on {plural(best)} from now on: {1000 * fastest:.1f} ms a "
                         f"{self.unit}, against {1000 * reference:.1f} ms on {self.current}")
            self.current = best
            self.recent = Window(self.results[best].units)
            self.baseline = self.recent.mean()
