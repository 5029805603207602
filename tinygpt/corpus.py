"""A corpus prepared once: its token ids written to the cache directory, memory-mapped and read a
window at a time (`read_windows`), so that a run's memory does not grow with the corpus and later
runs never re-read it.

Under `cache_dir()/corpora/`:
  <sha256>-<tokenizer>.ids    the ids: uint8 when the vocabulary fits in 256, else uint16 or uint32
  <sha256>-<tokenizer>.json   the sidecar: format, tokenizer, vocabulary, dtype, length, sha256
  seen/<sha256 of the path>.json   the file's size and modification time when it was last hashed
  seen/<sha256 of the path>.lock   held by the process preparing the file; the others wait
Preparation streams the file in chunks (its memory is bounded whatever the file's size) and
writes to temporary files renamed into place, the sidecar last: an ids file is used only with a
sidecar that describes it, so an interrupted preparation is never used; of two runs starting on
the same corpus at once, one prepares it while the other waits for it.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import hashlib
import json
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import write_atomically

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

FORMAT = 1
TOKENIZERS = ("chars", "bytes")
CHUNK = 16 << 20  # bytes read at a time
UNICODE = 0x110000  # code points
BOM = 0xFEFF
PROGRESS_AFTER = 2.0  # seconds of preparation before it reports progress
PROGRESS_EVERY = 1.0  # seconds between its reports


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared corpus: `ids` (N,) memory-mapped, and what a checkpoint records of it."""

    ids: np.ndarray
    tokenizer: str  # "chars" or "bytes"
    vocab: str | None  # the characters, sorted by code point; None for bytes (ids are the bytes)
    path: Path
    sha256: str

    @property
    def vocab_size(self) -> int:
        return 256 if self.vocab is None else len(self.vocab)

    @property
    def record(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256}


def read_windows(ids: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """`ids[s:s + length]` for each s of `starts`, (B, length). From a prepared copy's memory map
    they are read from its file (pread), not through the map: each page fault of the map brings
    a whole page-cache folio (up to 2 MB) into the process's resident memory, so random windows
    would map the file's every page within a few hundred batches."""
    if isinstance(ids, np.memmap) and isinstance(ids.base, mmap.mmap) and hasattr(os, "pread"):
        fd = _files.get(ids.filename) or _files.setdefault(ids.filename, os.open(
            ids.filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        size = ids.itemsize
        rows = np.empty((len(starts), length), dtype=ids.dtype)  # (B, length)
        for row, start in zip(rows, starts.tolist()):
            row[:] = np.frombuffer(os.pread(fd, length * size, ids.offset + start * size),
                                   dtype=ids.dtype)
        return rows
    return ids[starts[:, None] + np.arange(length)]  # (B, length)


_files: dict[str, int] = {}  # the prepared files read_windows() reads, open for the process's life


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer that holds every id."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536
                    else np.uint32)


def load(path: str | os.PathLike, tokenizer: str, cache: Path,
         say: Callable[[str], None] = lambda line: None) -> Corpus:
    """The corpus in `path` as `tokenizer` ids, prepared under `cache` on first use (or in a
    temporary directory when `cache` cannot be written). `say` gets a line for each thing a user
    should know: progress, a copy prepared again, the temporary directory."""
    path = Path(path).resolve()
    size, mtime = _stat(path)
    try:
        (cache / "seen").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):  # can be written (permissions, a read-only disk)
            pass
    except OSError as e:
        say(f"the cache directory {cache} cannot be written ({e.strerror or e}); preparing "
            f"{path.name} in a temporary directory for this run only")
        with tempfile.TemporaryDirectory(prefix="tinygpt-corpus-") as scratch:
            corpus = _prepare(path, tokenizer, Path(scratch), say)
            return dataclasses.replace(corpus, ids=np.array(corpus.ids))  # before it goes
    if (prepared := _prepared(cache, path, tokenizer, size, mtime, say=None)) is not None:
        return prepared
    with _preparing(cache, path, say):  # one process at a time: the others wait, then map it
        if (prepared := _prepared(cache, path, tokenizer, size, mtime, say)) is not None:
            return prepared
        corpus = _prepare(path, tokenizer, cache, say)
        _remember(cache, path, size, mtime, corpus.sha256)
        return corpus


def _prepared(cache: Path, path: Path, tokenizer: str, size: int, mtime: int,
              say: Callable[[str], None] | None) -> Corpus | None:
    """The copy prepared for `path` as it is now, if there is a usable one; `say` (if given)
    hears why a copy is unusable."""
    sha256 = _known_sha256(cache, path, size, mtime)
    if sha256 is None:
        return None
    try:
        return _open(cache, path, tokenizer, sha256)
    except FileNotFoundError:
        return None  # not prepared with this tokenizer yet
    except _Stale as e:
        if say is not None:
            say(f"the prepared copy of {path.name} in {cache} is unusable ({e}); preparing it "
                "again")
        return None


@contextlib.contextmanager
def _preparing(cache: Path, path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Holds the lock on preparing `path` (the ranks of a torchrun job, two runs started at
    once); the operating system lets it go if its process dies."""
    fd = os.open(_seen_path(cache, path).with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _lock(fd, wait=False):
            say(f"waiting for another process preparing {path.name}")
            while not _lock(fd, wait=True):
                pass
        yield
    finally:
        os.close(fd)  # and with it, the lock


def _lock(fd: int, wait: bool) -> bool:
    """Locks `fd`'s file exclusively; False if another process holds it (after about 10 s of
    waiting on Windows, at once on other systems unless `wait`)."""
    try:
        if sys.platform == "win32":
            msvcrt.locking(fd, msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:  # BlockingIOError, or Windows' deadlock error after its retries
        return False
    return True


class _Stale(Exception):
    """A prepared copy that must not be used: corrupt, truncated, or of another format."""


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path} ({e.strerror or e})") from e
    if not path.is_file():
        raise UserError(f"data path is not a file: {path}")
    return st.st_size, st.st_mtime_ns


def _seen_path(cache: Path, path: Path) -> Path:
    return cache / "seen" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"


def _known_sha256(cache: Path, path: Path, size: int, mtime: int) -> str | None:
    """The sha256 recorded for `path` if its size and modification time are still those."""
    try:
        seen = json.loads(_seen_path(cache, path).read_text())
        if seen["path"] == str(path) and seen["size"] == size and seen["mtime_ns"] == mtime:
            return str(seen["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _remember(cache: Path, path: Path, size: int, mtime: int, sha256: str) -> None:
    record = {"path": str(path), "size": size, "mtime_ns": mtime, "sha256": sha256}
    with contextlib.suppress(OSError):  # only a later run's shortcut is lost
        write_atomically(_seen_path(cache, path), lambda f: f.write(json.dumps(record).encode()))


def _names(cache: Path, sha256: str, tokenizer: str) -> tuple[Path, Path]:
    stem = cache / f"{sha256}-{tokenizer}"
    return stem.with_suffix(".ids"), stem.with_suffix(".json")


def _open(cache: Path, path: Path, tokenizer: str, sha256: str) -> Corpus:
    """The prepared copy of the file with `sha256`, checked against its sidecar; FileNotFoundError
    when there is none, _Stale when it must not be used."""
    ids_path, meta_path = _names(cache, sha256, tokenizer)
    text = meta_path.read_text()  # FileNotFoundError: not prepared
    try:
        meta = json.loads(text)
        if meta.get("format") != FORMAT:
            raise _Stale(f"format {meta.get('format')!r}, not {FORMAT}")
        if meta["sha256"] != sha256 or meta["tokenizer"] != tokenizer:
            raise _Stale("its sidecar describes another file")
        vocab = meta["vocab"] if tokenizer == "chars" else None
        vocab_size = 256 if vocab is None else len(vocab)
        dtype, length = np.dtype(meta["dtype"]), int(meta["length"])
        if dtype != id_dtype(vocab_size) or length < 1:
            raise _Stale("its sidecar is inconsistent")
    except (ValueError, KeyError, TypeError) as e:
        raise _Stale(f"unreadable sidecar: {e}") from e
    try:
        found = ids_path.stat().st_size
    except FileNotFoundError:
        raise _Stale("its ids file is missing") from None
    if found != length * dtype.itemsize:
        raise _Stale(f"{found:,} bytes of ids where the sidecar says {length * dtype.itemsize:,}")
    if vocab is not None and _largest(ids_path, dtype) >= vocab_size:
        raise _Stale(f"ids beyond its vocabulary of {vocab_size}")
    ids = np.memmap(ids_path, dtype=dtype, mode="r", shape=(length,))
    return Corpus(ids, tokenizer, vocab, path, sha256)


def _largest(ids_path: Path, dtype: np.dtype) -> int:
    """The largest id in the file, read a chunk at a time: through the memory map, every page
    would stay in the process's resident memory."""
    buffer = np.empty(CHUNK // dtype.itemsize, dtype=dtype)
    largest = 0
    with open(ids_path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            largest = max(largest, int(buffer[:n // dtype.itemsize].max()))
    return largest


def _chunks(path: Path, progress: _Progress) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                progress.advance(len(chunk))
                yield chunk
    except OSError as e:
        raise UserError(f"cannot read data file {path} ({e.strerror or e})") from e


def _code_points(path: Path, digest, progress: _Progress) -> Iterator[np.ndarray]:
    """The file's characters as code points, a chunk at a time, less a leading byte-order mark;
    UserError for an empty, binary or non-UTF-8 file. Feeds every byte to `digest`."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes before this chunk
    chars = 0
    for chunk in _chunks(path, progress):
        digest.update(chunk)
        if b"\x00" in chunk:
            raise UserError(f"data file looks binary (it contains NUL bytes): {path}")
        pending = len(decoder.getstate()[0])
        try:
            if chunk.isascii() and not pending:  # the common case, without decoding
                codes = np.frombuffer(chunk, dtype=np.uint8)
            else:
                codes = np.frombuffer(decoder.decode(chunk).encode("utf-32-le"), dtype=np.uint32)
        except UnicodeDecodeError as e:
            at = offset - pending + e.start
            raise UserError(f"data file is not UTF-8 text (bad byte at offset {at}): {path}") \
                from None
        offset += len(chunk)
        if not chars and len(codes) and codes[0] == BOM:  # some editors start UTF-8 files with
            codes = codes[1:]  # one: it is not a character of the text
        chars += len(codes)
        yield codes
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(f"data file is not UTF-8 text (it ends inside a character): {path}") \
            from None
    if not chars:
        raise UserError(f"data file is empty: {path}")


class _Progress:
    """`preparing NAME: 41% (412 MB of 1,000 MB)` on stderr, once preparation has taken
    PROGRESS_AFTER seconds, at most once a second."""

    def __init__(self, path: Path, total: int, say):
        self.name, self.total, self.say = path.name, 2 * max(total, 1), say  # two passes
        self.start = self.last = time.monotonic()
        self.done = 0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.start >= PROGRESS_AFTER and now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.say(f"preparing {self.name}: {100 * self.done // self.total}% "
                     f"({self.done / 2e6:,.0f} MB of {self.total / 2e6:,.0f} MB)")


def _prepare(path: Path, tokenizer: str, cache: Path, say) -> Corpus:
    """Two passes over the file: the sha256 and vocabulary, then, unless a copy with that sha256
    is prepared already, the ids; the file must read the same both times."""
    size = path.stat().st_size
    progress = _Progress(path, size, say)
    digest = hashlib.sha256()
    if tokenizer == "bytes":
        for chunk in _chunks(path, progress):
            digest.update(chunk)
        if not size:
            raise UserError(f"data file is empty: {path}")
        vocab, table = None, None
    else:
        seen = np.zeros(UNICODE, dtype=bool)
        for codes in _code_points(path, digest, progress):
            seen[codes] = True
        codes_used = np.flatnonzero(seen)
        vocab = "".join(map(chr, codes_used))
        table = np.zeros(UNICODE, dtype=id_dtype(len(vocab)))
        table[codes_used] = np.arange(len(vocab))
    sha256 = digest.hexdigest()
    with contextlib.suppress(FileNotFoundError, _Stale):  # the same bytes under another name
        return _open(cache, path, tokenizer, sha256)  # or time: prepared already
    ids_path, meta_path = _names(cache, sha256, tokenizer)
    dtype = np.dtype(np.uint8) if table is None else table.dtype
    check = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".prepare-")
    length = 0
    try:
        with os.fdopen(fd, "wb") as out:
            if table is None:
                for chunk in _chunks(path, progress):
                    check.update(chunk)
                    out.write(chunk)
                    length += len(chunk)
            else:
                for codes in _code_points(path, check, progress):
                    out.write(table[codes].tobytes())
                    length += len(codes)
            out.flush()
            os.fsync(out.fileno())
        if check.hexdigest() != sha256:
            raise UserError(f"data file {path} changed while it was being prepared; run again "
                            "once it is written")
        os.replace(tmp, ids_path)
        meta = {"format": FORMAT, "tokenizer": tokenizer, "sha256": sha256, "dtype": dtype.name,
                "length": length, "vocab": vocab, "source": str(path)}
        sidecar = json.dumps(meta, ensure_ascii=False).encode()
        write_atomically(meta_path, lambda f: f.write(sidecar))
    except OSError as e:  # a full disk, most often: without its sidecar, the ids are never used
        raise UserError(f"cannot write the prepared corpus to {cache} ({e.strerror or e}); set "
                        "TINYGPT_CACHE to a directory with room for it") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return _open(cache, path, tokenizer, sha256)
