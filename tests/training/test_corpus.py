"""A corpus prepared once (tinygpt/corpus.py): the ids equal the tokenizer's, whatever the chunk
boundaries cut; later runs do not read the text; a changed file, a corrupt cache, an interrupted
or concurrent preparation and an unwritable cache directory all end right."""

import errno
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch

from tinygpt import corpus
from tinygpt.data import Batches, ByteTokenizer, Tokenizer
from tinygpt.errors import UserError

MIXED = "Thé quick\n brown fox — 中文 🙂 jumps\n"  # one- to four-byte characters


def expected_ids(text: str) -> tuple[str, list[int]]:
    vocab = "".join(sorted(set(text)))
    return vocab, Tokenizer(vocab).encode(text)


def said_lines():
    lines = []
    return lines, lines.append


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def write(path, text: str, bom: bool = False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 1 << 20])
def test_ids_are_the_tokenizers_whatever_the_chunks_cut(tmp_path, cache, monkeypatch, chunk):
    """Chunks of 1 to 7 bytes split every multi-byte character somewhere; the leading
    byte-order mark goes, a later one is a character."""
    monkeypatch.setattr(corpus, "CHUNK", chunk)
    text = MIXED * 20 + "\ufeff"
    loaded = corpus.load(write(tmp_path / "t.txt", text, bom=True), "chars", cache)
    vocab, ids = expected_ids(text)
    assert loaded.vocab == vocab and loaded.ids.dtype == np.uint8
    assert loaded.ids.tolist() == ids


def test_ids_widen_with_the_vocabulary(tmp_path, cache):
    text = "".join(map(chr, range(0x4E00, 0x4E00 + 300))) * 2  # 300 characters: uint16
    loaded = corpus.load(write(tmp_path / "wide.txt", text), "chars", cache)
    assert loaded.ids.dtype == np.uint16 and loaded.ids.tolist() == expected_ids(text)[1]
    assert corpus.id_dtype(65536) == np.uint16 and corpus.id_dtype(65537) == np.uint32


@pytest.mark.parametrize("content,message", [
    (b"", "data file is empty"),
    (b"\xef\xbb\xbf", "data file is empty"),
    (b"abc\x00def", "looks binary"),
    (b"caf\xe9 au lait", "not UTF-8 text (bad byte at offset 3)"),
    (b"\xef\xbb\xbfabcdefgh\xff", "not UTF-8 text (bad byte at offset 11)"),
    ("abcdé".encode()[:-1], "not UTF-8 text (it ends inside a character)"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, cache, monkeypatch, content, message):
    monkeypatch.setattr(corpus, "CHUNK", 4)  # the bad byte in a later chunk than the first
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(message)):
        corpus.load(path, "chars", cache)
    assert not [p for p in cache.iterdir() if p.is_file()]  # nothing prepared


def test_a_missing_file_or_a_directory_is_refused(tmp_path, cache):
    with pytest.raises(UserError, match="data file not found"):
        corpus.load(tmp_path / "absent.txt", "chars", cache)
    with pytest.raises(UserError, match="data path is not a file"):
        corpus.load(tmp_path, "chars", cache)


def test_a_later_load_does_not_read_the_text(tmp_path, cache, monkeypatch):
    path = write(tmp_path / "t.txt", MIXED * 10)
    first = corpus.load(path, "chars", cache)

    def unread(*args):
        raise AssertionError("the text was read again")

    monkeypatch.setattr(corpus, "_chunks", unread)
    again = corpus.load(path, "chars", cache)
    assert again.sha256 == first.sha256 and np.array_equal(again.ids, first.ids)


def test_a_changed_file_is_prepared_again(tmp_path, cache):
    path = write(tmp_path / "t.txt", "abc" * 100)
    first = corpus.load(path, "chars", cache)
    write(path, "abd" * 100)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second = corpus.load(path, "chars", cache)
    assert second.sha256 != first.sha256 and second.vocab == "abd"
    assert second.ids.tolist() == expected_ids("abd" * 100)[1]


def test_a_touched_but_unchanged_file_is_hashed_not_prepared_again(tmp_path, cache):
    path = write(tmp_path / "t.txt", "abc" * 100)
    first = corpus.load(path, "chars", cache)
    ids_file = next(cache.glob("*.ids"))
    before = ids_file.stat().st_ino, ids_file.stat().st_mtime_ns
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert corpus.load(path, "chars", cache).sha256 == first.sha256
    assert (ids_file.stat().st_ino, ids_file.stat().st_mtime_ns) == before


def corrupt_ids_truncated(ids, meta):
    ids.write_bytes(ids.read_bytes()[:-1])


def corrupt_ids_missing(ids, meta):
    ids.unlink()


def corrupt_sidecar_garbage(ids, meta):
    meta.write_text("{not json")


def corrupt_sidecar_format(ids, meta):
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format": 99}))


def corrupt_sidecar_length(ids, meta):
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "length": record["length"] + 5}))


def corrupt_ids_beyond_vocab(ids, meta):
    data = bytearray(ids.read_bytes())
    data[7] = 200
    ids.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt,reason", [
    (corrupt_ids_truncated, "299 bytes of ids where the sidecar says 300"),
    (corrupt_ids_missing, "its ids file is missing"),
    (corrupt_sidecar_garbage, "unreadable sidecar"),
    (corrupt_sidecar_format, "format 99, not 1"),
    (corrupt_sidecar_length, "300 bytes of ids where the sidecar says 305"),
    (corrupt_ids_beyond_vocab, "ids beyond its vocabulary of 3"),
])
def test_a_corrupt_cache_is_noticed_and_rebuilt_with_one_line(tmp_path, cache, corrupt, reason):
    path = write(tmp_path / "t.txt", "abc" * 100)
    corpus.load(path, "chars", cache)
    (ids,), (meta,) = cache.glob("*.ids"), cache.glob("*.json")
    corrupt(ids, meta)
    lines, say = said_lines()
    again = corpus.load(path, "chars", cache, say)
    assert again.ids.tolist() == expected_ids("abc" * 100)[1]
    assert len(lines) == 1 and reason in lines[0] and "preparing it again" in lines[0], lines
    assert corpus.load(path, "chars", cache, say) and len(lines) == 1  # whole again


def test_an_interrupted_preparation_leaves_nothing_a_later_run_would_use(tmp_path, cache,
                                                                         monkeypatch):
    path = write(tmp_path / "t.txt", MIXED * 50)
    monkeypatch.setattr(corpus, "CHUNK", 64)
    real = corpus._code_points
    passes = []

    def interrupted(path, digest, progress):
        passes.append(path)
        for i, codes in enumerate(real(path, digest, progress)):
            if len(passes) == 2 and i == 3:  # the second pass, writing, a few chunks in
                raise KeyboardInterrupt
            yield codes

    monkeypatch.setattr(corpus, "_code_points", interrupted)
    with pytest.raises(KeyboardInterrupt):
        corpus.load(path, "chars", cache)
    assert sorted(p.name for p in cache.iterdir() if p.is_file()) == []
    monkeypatch.setattr(corpus, "_code_points", real)
    assert corpus.load(path, "chars", cache).ids.tolist() == expected_ids(MIXED * 50)[1]


def test_a_disk_that_fills_while_preparing_ends_in_one_line_and_touches_no_checkpoint(tmp_path):
    """The ids stop at a file-size limit (the kernel's EFBIG, as ENOSPC would on a full disk):
    the resumed run says so in one line, leaves nothing in the cache, its checkpoint as it was."""
    from runs import TINY, tiny_run

    path = write(tmp_path / "t.txt", "".join(random.Random(0).choices("abcdefgh \n", k=300_000)))
    tiny_run(tmp_path, path, max_iters=2, eval_interval=2)
    ckpts = {p: p.read_bytes() for p in (tmp_path / "out").glob("*.pt")}
    cache = tmp_path / "other-cache"
    limit = 100_000  # bytes: the text is 300,000

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process

    proc = subprocess.run(
        [sys.executable, "-m", "tinygpt", "train", "--resume", "--out-dir", str(tmp_path / "out"),
         "--max-iters", "4", "--device", TINY["device"]], capture_output=True, text=True,
        env={**os.environ, "TINYGPT_CACHE": str(cache)}, preexec_fn=small_disk, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert re.fullmatch(r"tinygpt: error: cannot write the prepared corpus to \S+ \(File too "
                        r"large\); set TINYGPT_CACHE to a directory with room for it", lines[0])
    assert not [p for p in (cache / "corpora").iterdir() if p.is_file()]
    assert {p: p.read_bytes() for p in (tmp_path / "out").glob("*.pt")} == ckpts


def test_a_sidecar_that_cannot_be_written_leaves_ids_no_run_uses(tmp_path, cache, monkeypatch):
    path = write(tmp_path / "t.txt", "abc" * 100)
    real = corpus.write_atomically

    def full(target, write):
        if target.parent == cache:  # the sidecar; the seen-record lives in seen/
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(target, write)

    monkeypatch.setattr(corpus, "write_atomically", full)
    with pytest.raises(UserError, match=r"cannot write the prepared corpus .*No space left"):
        corpus.load(path, "chars", cache)
    monkeypatch.setattr(corpus, "write_atomically", real)
    lines, say = said_lines()
    assert corpus.load(path, "chars", cache, say).ids.tolist() == expected_ids("abc" * 100)[1]
    assert lines == []  # the ids without a sidecar were never a prepared copy


def test_a_file_that_changes_while_it_is_prepared_is_refused(tmp_path, cache, monkeypatch):
    path = write(tmp_path / "t.txt", "abc" * 100)
    real = corpus._code_points
    passes = []

    def changing(p, digest, progress):
        passes.append(p)
        if len(passes) == 2:  # between the passes, the file is rewritten
            write(path, "abc" * 99 + "abd")
        return real(p, digest, progress)

    monkeypatch.setattr(corpus, "_code_points", changing)
    with pytest.raises(UserError, match="changed while it was being prepared"):
        corpus.load(path, "chars", cache)
    assert not [p for p in cache.iterdir() if p.is_file()]


def test_an_unwritable_cache_still_loads_in_memory_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = write(tmp_path / "t.txt", "abc" * 100)
    lines, say = said_lines()
    loaded = corpus.load(path, "chars", blocker / "cache", say)
    assert loaded.ids.tolist() == expected_ids("abc" * 100)[1]
    assert len(lines) == 1 and "cannot be written" in lines[0]
    assert not isinstance(loaded.ids, np.memmap)  # its temporary file is gone


def test_preparation_memory_is_bounded_by_the_chunk(tmp_path, cache, monkeypatch):
    """8 MB of text in chunks of 64 KiB: far less than the text is ever held (the fixed cost is
    the two tables over every code point, 1.1 MB each)."""
    monkeypatch.setattr(corpus, "CHUNK", 64 << 10)
    path = write(tmp_path / "big.txt", (MIXED * 250_000)[:8_000_000])
    tracemalloc.start()
    try:
        corpus.load(path, "chars", cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4e6, f"{peak:,} bytes at the peak"


def test_progress_is_shown_for_a_long_preparation(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK", 100)
    monkeypatch.setattr(corpus, "PROGRESS_AFTER", 0.0)
    monkeypatch.setattr(corpus, "PROGRESS_EVERY", 0.0)
    lines, say = said_lines()
    corpus.load(write(tmp_path / "t.txt", "abc" * 1000), "chars", cache, say)
    assert lines[0] == "preparing t.txt: 1% (0 MB of 0 MB)"
    assert lines[-1].startswith("preparing t.txt: 100%") and len(lines) == 60  # 2 passes x 30


def test_two_runs_starting_at_once_prepare_once_and_both_end_right(tmp_path, cache):
    """Two processes load a new corpus at the same moment (a torchrun job's ranks): one prepares
    it, the other waits and maps the same file."""
    path = write(tmp_path / "t.txt", MIXED * 200_000)  # ~8 MB: a second or more to prepare
    go = tmp_path / "go"
    code = ("import os, sys, time; from pathlib import Path; from tinygpt import corpus\n"
            "real = corpus._prepare\n"
            "def prepare(*args):\n    print('prepared', file=sys.stderr); return real(*args)\n"
            "corpus._prepare = prepare\n"
            "while not os.path.exists(sys.argv[3]): time.sleep(0.01)\n"
            "c = corpus.load(sys.argv[1], 'chars', Path(sys.argv[2]), print)\n"
            "print(c.sha256, int(c.ids.astype('int64').sum()), len(c.ids))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(cache), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(3)  # both started and waiting for the word
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    vocab, ids = expected_ids(MIXED * 200_000)
    last_lines = [out.splitlines()[-1] for out, _ in results]
    assert last_lines[0] == last_lines[1] and last_lines[0].split()[1:] == [str(sum(ids)),
                                                                            str(len(ids))]
    assert sorted(err.count("prepared") for _, err in results) == [0, 1], results
    assert any("waiting for another process preparing t.txt" in out for out, _ in results)
    assert corpus.load(path, "chars", cache).ids.tolist() == ids


def test_batches_are_todays_bit_for_bit(corpus_path, cache):
    """The windows drawn from the memory map equal those of the int64 corpus tensor that
    Batches indexed before: same seed, same batches, so the same losses."""
    loaded = corpus.load(corpus_path, "chars", cache)
    data = torch.from_numpy(np.array(Tokenizer(loaded.vocab).encode(
        corpus_path.read_text(encoding="utf-8").removeprefix("\ufeff")), dtype=np.int64))
    n_train = int(0.9 * len(data))
    batches = Batches(loaded.ids, 64, 12, torch.device("cpu"), seed=1337, streams=range(2))
    before = {s: torch.Generator().manual_seed((1337 * 1_000_003 + s + 1) % 2**64)
              for s in (0, 1, Batches.EVAL_STREAM)}
    for split, stream in [("train", 0), ("train", 1), ("val", -1), ("train", 0)] * 3:
        part = data[:n_train] if split == "train" else data[n_train:]
        starts = torch.randint(len(part) - 64, (12,), generator=before[stream])
        windows = part[starts[:, None] + torch.arange(65)]
        x, y = batches.get(split, stream)
        assert x.dtype == torch.int64
        assert torch.equal(x, windows[:, :-1]) and torch.equal(y, windows[:, 1:])


def resident_file_pages() -> int:
    """Bytes of files mapped into this process and resident (RssFile, Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssFile is Linux's")
def test_random_windows_do_not_bring_the_corpus_into_resident_memory(tmp_path, cache):
    """Through the memory map, every window drawn would map a page-cache folio (64 KB to 2 MB)
    into the process: 600 batches would make most of a 32 MB corpus resident."""
    path = tmp_path / "t.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 32 << 20, dtype=np.uint8))
    loaded = corpus.load(path, "bytes", cache)
    batches = Batches(loaded.ids, 64, 12, torch.device("cpu"), seed=0)
    before = resident_file_pages()
    for _ in range(300):
        batches.get("train", 0), batches.get("val")
    assert resident_file_pages() - before < 4 << 20


@pytest.mark.corpus
def test_a_second_run_on_a_corpus_does_not_read_its_text(tmp_path, corpus_path, monkeypatch):
    from runs import tiny_run

    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    first = tiny_run(tmp_path / "a", corpus_path, max_iters=2, eval_interval=2)

    def unread(*args):
        raise AssertionError("the text was read again")

    monkeypatch.setattr(corpus, "_chunks", unread)
    second = tiny_run(tmp_path / "b", corpus_path, max_iters=2, eval_interval=2)
    losses = [[(h["train"], h["val"]) for h in run["history"]] for run in (first, second)]
    assert losses[0] == losses[1]
    (meta,) = (tmp_path / "cache" / "corpora").glob("*.json")
    assert json.loads(meta.read_text())["length"] == len(corpus_path.read_text(encoding="utf-8"))


def test_bytes_take_any_file_one_token_a_byte(tmp_path, cache):
    """NULs, bytes that are not UTF-8 and a leading byte-order mark are all tokens."""
    content = b"\xef\xbb\xbf" + bytes(range(256)) + b"caf\xe9\x00"
    path = tmp_path / "any.bin"
    path.write_bytes(content)
    loaded = corpus.load(path, "bytes", cache)
    assert loaded.vocab is None and loaded.vocab_size == 256 and loaded.ids.dtype == np.uint8
    assert loaded.ids.tobytes() == content
    with pytest.raises(UserError, match="looks binary"):  # as characters, it is refused
        corpus.load(path, "chars", cache)


def test_the_byte_tokenizer_decodes_as_utf8_a_character_cut_between_tokens_whole():
    tok = ByteTokenizer()
    assert tok.encode("é🙂") == list("é🙂".encode()) and tok.decode(b"caf\xe9") == "caf\ufffd"
    decode = tok.streaming()
    assert [decode([b]) for b in "é🙂".encode()] == ["", "é", "", "", "", "🙂"]
    assert decode([0xF0, 0x9F]) == "" and decode([], final=True) == "\ufffd"
