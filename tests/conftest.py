"""Shared fixtures. Without CUDA, Triton kernels run in Triton's interpreter on the CPU: the
variable must be set before triton is first imported, which is why it is set here.

Tests that train on a corpus take the `corpus_path` fixture and are marked `corpus`. They use
../shared's tiny Shakespeare when it is there and a generated text otherwise; `--corpus generated`
runs them as a fresh clone would (CI does both), `--corpus shared` insists on the shared copy.

Every test draws from random generators seeded by its own name, so it sees the same inputs alone,
in the default order and in the shuffled order `--shuffle SEED` runs (CI runs one).

A child process that outlives its timeout fails its test with the Python stacks of every process
it started (`ChildProcess`), not with a bare TimeoutExpired.
"""

import atexit
import contextlib
import os
import random
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import pytest

from tinygpt.threads import reproducible_blas, usable_cores

reproducible_blas()  # as the command line does, before torch first multiplies matrices
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

if (workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT")) is not None:
    # pytest-xdist's workers share the cores: torch's threads in each, one worker's share, so
    # that none waits on threads the others keep busy. Results do not depend on the count.
    torch.set_num_threads(max(1, usable_cores() // int(workers)))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tinygpt.kernels.gpu import interpreted  # noqa: E402 (after TRITON_INTERPRET is set)


def _tensor_core_dots() -> None:
    """Triton's interpreter multiplies the raw 16-bit patterns of bf16 `tl.dot` operands as if
    they were integers (triton-lang/triton#11584, declined upstream), and multiplies fp32 ones in
    full precision whatever `input_precision` asks. This harness, never the product, makes its
    dots read operands as tensor cores do: bf16 widened to the fp32 values they stand for (exact:
    a bf16 is the top half of an fp32), so the bf16 kernels run here; and fp32 cut to tf32's 10
    mantissa bits where a dot asks for tf32, so that a kernel which would lose fp32 precision on a
    GPU loses it here too. tests/kernels/test_attention.py says what this covers."""
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def as_tensor_cores_read(t, input_precision):
        if t.dtype.scalar == tl.bfloat16:
            bits = t.data.astype(np.uint32) << 16  # (..., K) the fp32 bit patterns
        elif t.dtype.scalar == tl.float32 and input_precision == ir.INPUT_PRECISION.TF32:
            bits = t.data.view(np.uint32) & np.uint32(0xFFFFE000)  # 13 low mantissa bits gone
        else:
            return t
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, as_tensor_cores_read(a, input_precision),
                   as_tensor_cores_read(b, input_precision), d, input_precision,
                   max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _device_calls_patch_once() -> None:
    """Triton's interpreter patches triton.language for itself when a kernel launches, and again
    (never undone) at every call of a @triton.jit helper inside it: a fifth of an attention
    test's time. Here a helper's call patches only what is not patched already."""
    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang = getattr(interpreter, "_patch_lang", None)
    no_patches = getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or no_patches is None:  # another Triton's interpreter: left as it is
        return

    def patch_unless_patched(fn):
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if langs and not any(tl.core.is_builtin(lang.arange) for lang in langs):
            return no_patches()  # every language it sees is patched already
        return patch_lang(fn)

    interpreter._patch_lang = patch_unless_patched


if interpreted():
    _tensor_core_dots()
    _device_calls_patch_once()
# Every Python process the tests start prints each thread's stack when it is sent SIGABRT.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
# Prepared corpora and kernel verdicts go to a cache of the tests' own, never the user's; every
# process the tests start inherits it.
os.environ["TINYGPT_CACHE"] = tempfile.mkdtemp(prefix="tinygpt-tests-cache-")
atexit.register(shutil.rmtree, os.environ["TINYGPT_CACHE"], ignore_errors=True)

SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def generated_text(n_chars: int = 200_000, seed: int = 0) -> str:
    """Learnable stand-in for the corpus: sentences of words from a fixed lexicon of 300 words, each
    one to three consonant-vowel(-consonant) syllables, so that a character's neighbour tells as
    much about it as in English (tiny Shakespeare's unigram / bigram entropies: 3.31 / 2.45 nats;
    this text's: 3.10 / 2.21)."""
    rng = random.Random(seed)

    def syllable() -> str:
        coda = rng.choice("nrst") if rng.random() < 0.3 else ""
        return rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") + coda

    words = ["".join(syllable() for _ in range(rng.randint(1, 3))) for _ in range(300)]
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choices(words, k=rng.randint(4, 12))).capitalize() + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core this process may run on (pytest-xdist counts the machine's,
    which a container or `taskset` may not give)."""
    return usable_cores()


def pytest_addoption(parser):
    parser.addoption("--shuffle", type=int, metavar="SEED",
                     help="run the tests in an order shuffled by SEED")
    parser.addoption("--corpus", choices=("auto", "shared", "generated"), default="auto",
                     help="text for the tests marked corpus: ../shared's tiny Shakespeare when "
                          "present (auto), always it (shared) or the generated stand-in")


def pytest_configure(config):
    if config.getoption("--corpus") == "shared" and not SHARED_CORPUS.is_file():
        raise pytest.UsageError(f"--corpus shared: {SHARED_CORPUS} not found")


def pytest_report_header(config):
    seed = config.getoption("--shuffle")
    return None if seed is None else f"test order shuffled: --shuffle {seed}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "corpus_path" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.corpus)
    seed = config.getoption("--shuffle")
    if seed is not None:  # modules in a shuffled order, each one's tests shuffled among them:
        # interleaving modules would set their module-scoped fixtures up again at every switch
        rng = random.Random(seed)
        modules: dict[Path, list] = {}
        for item in items:
            modules.setdefault(item.path, []).append(item)
        order = list(modules.values())
        rng.shuffle(order)
        for tests in order:
            rng.shuffle(tests)
        items[:] = [item for tests in order for item in tests]
    # The longest first, so that pytest-xdist's workers end together, not one of them on a
    # minute-long test while the other waits (a stable sort: the order within each part stays).
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def seeded_generators(request):
    """torch's and Python's global generators seeded from the test's id, whatever ran before."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(scope="session")
def corpus_path(request, tmp_path_factory) -> Path:
    """tiny Shakespeare from ../shared or a generated text, as --corpus says."""
    if request.config.getoption("--corpus") != "generated" and SHARED_CORPUS.is_file():
        return SHARED_CORPUS
    path = tmp_path_factory.mktemp("corpus") / "generated.txt"
    path.write_text(generated_text(), encoding="utf-8")
    return path


@pytest.fixture
def small_text_file(tmp_path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text(generated_text(20_000, seed=1), encoding="utf-8")
    return path


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, parents before children (from Linux's /proc; elsewhere `root`
    alone)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone since the listing
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # "pid (name) state ppid ..."
        children.setdefault(ppid, []).append(int(entry.name))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, ()))
    return tree


def abort_with_stacks(roots: list[int]) -> list[int]:
    """End hung processes, `roots` and their descendants, so that each Python one prints the
    stack of every thread where it stood (PYTHONFAULTHANDLER) to its stderr. All are stopped
    first, so that none reacts to another's end; then, children first, each is sent SIGABRT
    without a core dump and let go, one at a time. Returns the pids it signalled."""
    tree = [pid for root in roots for pid in process_tree(root)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGSTOP)
    for pid in reversed(tree):
        try:
            if hasattr(resource, "prlimit"):
                resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
            os.kill(pid, signal.SIGABRT)
            os.kill(pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            continue
        time.sleep(0.2)  # one process's stacks at a time
    return tree


class ChildProcess(subprocess.Popen):
    """`subprocess.Popen` whose `communicate` fails the test when the timeout passes, with the
    end of the child's stderr: the stacks of its processes (`abort_with_stacks`)."""

    def communicate(self, input=None, timeout=None):
        try:
            return super().communicate(input, timeout)
        except subprocess.TimeoutExpired:
            tree = abort_with_stacks([self.pid])
            try:
                _, err = super().communicate(timeout=30)
            except subprocess.TimeoutExpired:
                for pid in tree:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                _, err = super().communicate()
            if isinstance(err, bytes):
                err = err.decode(errors="replace")
            pytest.fail(f"{self.args} still running after {timeout} s; its processes were sent "
                        f"SIGABRT. The end of its stderr:\n{(err or '(not captured)')[-10000:]}",
                        pytrace=False)


@pytest.fixture(scope="session")
def spawn_job():
    """`torch.multiprocessing.spawn(fn, args, nprocs)` for a test, joined within `timeout` s: a
    job still running then fails the test, its processes' stacks in the captured stderr
    (`abort_with_stacks`)."""

    def spawn(fn, args: tuple, nprocs: int, *, timeout: float) -> None:
        context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                abort_with_stacks(context.pids())
                for process in context.processes:
                    process.join(30)
                    if process.is_alive():
                        process.kill()
                pytest.fail(f"{fn.__name__} still running in {nprocs} processes after {timeout} "
                            "s; they were sent SIGABRT: their stacks are in the captured stderr",
                            pytrace=False)

    return spawn


@pytest.fixture(scope="session")
def run_command():
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=...)` for a test, whose
    timeout fails it with the stacks of the command's processes (`ChildProcess`)."""

    def run(cmd, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
        with ChildProcess(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs) as proc:
            out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    return run


@pytest.fixture
def spawn():
    """`ChildProcess` for a test: a process still running when the test ends is killed, so that a
    failing test leaves nothing behind."""
    started = []

    def popen(*args, **kwargs) -> ChildProcess:
        started.append(ChildProcess(*args, **kwargs))
        return started[-1]

    yield popen
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
