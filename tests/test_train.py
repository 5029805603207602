"""Training, checkpoints, resuming, sampling and the command line, on tiny CPU models."""

import collections
import hashlib
import math
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinygpt import checkpoint as ckpt_mod
from tinygpt import train as train_mod
from tinygpt.checkpoint import load_checkpoint, save_checkpoint
from tinygpt.cli import main
from tinygpt.config import ModelConfig
from tinygpt.data import Tokenizer
from tinygpt.errors import UserError
from tinygpt.model import build_model
from tinygpt.train import train

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.0,
            eval_iters=4, warmup_iters=10, lr=3e-3, device="cpu", backend="torch")


def tiny_run(tmp_path, corpus, **kw):
    overrides = {**TINY, "out_dir": str(tmp_path / "out"), **kw}
    return train("cpu-baby", overrides, data=str(corpus), log_interval=1000)


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what earlier steps printed
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def char_entropies(text: str) -> tuple[float, float]:
    """(unigram, bigram) entropy of text's characters in nats: the loss of the best predictor that
    sees no context, and of the best that sees the previous character."""
    n = len(text)
    counts = collections.Counter(text)
    pairs = collections.Counter(zip(text, text[1:]))
    unigram = -sum(c / n * math.log(c / n) for c in counts.values())
    bigram = -sum(c / (n - 1) * math.log(c / counts[a]) for (a, _), c in pairs.items())
    return unigram, bigram


def test_training_lowers_val_loss(tmp_path, corpus_path):
    """From ln(vocab) at init, 200 steps learn at least half of what the previous character can
    teach: val loss ends below the midpoint of the corpus's unigram and bigram entropies (tiny
    Shakespeare: 2.88, reached 2.70; the generated text: 2.66, reached 2.30)."""
    text = corpus_path.read_text(encoding="utf-8")
    unigram, bigram = char_entropies(text)
    summary = tiny_run(tmp_path, corpus_path, max_iters=200, eval_interval=100,
                       lr_decay_iters=200)
    first, last = summary["history"][0], summary["history"][-1]
    assert [h["iter"] for h in summary["history"]] == [0, 100, 200]
    assert abs(first["val"] - math.log(len(set(text)))) < 0.1
    assert last["val"] < (unigram + bigram) / 2, (unigram, bigram, summary["history"])
    assert (tmp_path / "out" / "best.pt").is_file() and (tmp_path / "out" / "last.pt").is_file()


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = build_model(cfg)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model_config": vars(cfg), "train_config": {}, "iteration": 7,
                           "model": model.state_dict(), "vocab": "abcdefghijk"})
    loaded = load_checkpoint(path)
    clone = build_model(ModelConfig(**loaded["model_config"]))
    clone.load_state_dict(loaded["model"])
    idx = torch.randint(0, 11, (2, 16))
    assert torch.equal(model(idx)[0], clone(idx)[0])
    assert loaded["iteration"] == 7


def test_checkpoint_bytes_reach_the_disk_before_its_name(tmp_path, monkeypatch):
    """The whole temporary file is flushed and fsynced, then renamed, then the directory synced:
    a crash at any moment leaves the old checkpoint or the complete new one."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append("fsync dir" if stat.S_ISDIR(info.st_mode) else ("fsync", info.st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.getsize(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "ck.pt", {"model": {"w": torch.randn(10_001)}})
    size = (tmp_path / "ck.pt").stat().st_size
    assert events == [("fsync", size), ("rename", size), "fsync dir"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, corpus_path, optimizer):
    schedule = dict(eval_interval=10, lr_decay_iters=30, dropout=0.1, optimizer=optimizer)
    full = tiny_run(tmp_path / "a", corpus_path, max_iters=30, **schedule)
    tiny_run(tmp_path / "b", corpus_path, max_iters=20, **schedule)
    assert load_checkpoint(tmp_path / "b" / "out" / "last.pt")["iteration"] == 20
    resumed = train("cpu-baby", {"max_iters": 30, "out_dir": str(tmp_path / "b" / "out")},
                    data=str(corpus_path), resume=True, log_interval=1000)
    assert resumed["steps"] == 10
    assert [(h["train"], h["val"]) for h in resumed["history"]] == [
        (h["train"], h["val"]) for h in full["history"][-1:]]
    a = load_checkpoint(tmp_path / "a" / "out" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "out" / "last.pt")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_keeps_its_optimizer(tmp_path, corpus_path, capsys):
    """A Muon run resumed with AdamW (or the other way) is refused in one line: the state of one
    is no start for the other. So is a Muon rate for a run of AdamW alone."""
    for optimizer in ("adamw", "muon"):
        tiny_run(tmp_path / optimizer, corpus_path, max_iters=2, eval_interval=2,
                 optimizer=optimizer)
    out = tmp_path / "muon" / "out"
    before = (out / "last.pt").read_bytes()
    rc, _, err = run_cli(capsys, "train", "--resume", "--out-dir", str(out), "--optimizer",
                         "adamw", "--max-iters", "4")
    _one_line_error(rc, err, "--optimizer adamw differs from the checkpoint's muon; a resumed "
                             "run keeps the optimizer it was started with")
    assert (out / "last.pt").read_bytes() == before
    rc, _, err = run_cli(capsys, "train", "--resume", "--out-dir", str(tmp_path / "adamw" / "out"),
                         "--muon-lr", "0.01", "--max-iters", "4")
    _one_line_error(rc, err, "--muon-lr applies to --optimizer muon only, and this run's "
                             "optimizer is adamw")
    rc, _, _ = run_cli(capsys, "train", "--resume", "--out-dir", str(out), "--muon-lr", "0.01",
                       "--optimizer", "muon", "--max-iters", "4")
    assert rc == 0 and load_checkpoint(out / "last.pt")["train_config"]["muon_lr"] == 0.01


def test_a_checkpoint_from_before_muon_resumes_as_it_would_have(tmp_path, corpus_path):
    """Format 1 held one AdamW's state where format 2 holds a dict of optimizers: written in
    the old layout, a run resumes exactly as from the new one."""
    tiny_run(tmp_path / "new", corpus_path, max_iters=4, eval_interval=2, optimizer="adamw")
    payload = torch.load(tmp_path / "new" / "out" / "last.pt", weights_only=True)
    payload.update(format_version=1, optimizer=payload["optimizer"]["adamw"])
    old = tmp_path / "old" / "out"
    old.mkdir(parents=True)
    torch.save(payload, old / "last.pt")
    runs = [train("cpu-baby", {"max_iters": 6, "out_dir": str(d)}, data=str(corpus_path),
                  resume=True, log_interval=1000) for d in (tmp_path / "new" / "out", old)]
    assert [(h["iter"], h["train"], h["val"]) for h in runs[0]["history"]] == [
        (h["iter"], h["train"], h["val"]) for h in runs[1]["history"]]
    for name, weight in runs[0]["model"].state_dict().items():
        assert torch.equal(weight, runs[1]["model"].state_dict()[name]), name


def test_resume_rejects_other_model_or_data(tmp_path, corpus_path):
    tiny_run(tmp_path, corpus_path, max_iters=2, eval_interval=1)
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match="n-layer 3 differs"):
        train("cpu-baby", {"out_dir": out, "n_layer": 3}, data=str(corpus_path), resume=True)
    digits = tmp_path / "digits.txt"  # a vocabulary of digits and a space, unlike any corpus's
    digits.write_text(" ".join(map(str, range(5000))), encoding="utf-8")
    with pytest.raises(UserError, match="digits.txt is not the text .*--new-data"):
        train("cpu-baby", {"out_dir": out}, data=str(digits), resume=True)
    with pytest.raises(UserError, match="different vocabulary"):
        train("cpu-baby", {"out_dir": out}, data=str(digits), resume=True, new_data=True)


def test_sampling_is_seeded(tmp_path, corpus_path, capsys):
    """Equal seeds give equal text and other seeds other text; --temperature 0 gives the most
    likely character at every step, whatever the seed, in every sample."""
    tiny_run(tmp_path, corpus_path, max_iters=20, eval_interval=10)
    prompt = corpus_path.read_text(encoding="utf-8")[:2]
    args = ["sample", "--out-dir", str(tmp_path / "out"), "--prompt", prompt,
            "--max-new-tokens", "30", "--device", "cpu"]
    rc, first, _ = run_cli(capsys, *args, "--seed", "5")
    assert rc == 0 and first.startswith(prompt) and len(first) == len(prompt) + 30 + 1
    assert run_cli(capsys, *args, "--seed", "5")[1] == first
    assert run_cli(capsys, *args, "--seed", "6")[1] != first

    ckpt = load_checkpoint(tmp_path / "out" / "best.pt")
    model = build_model(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    tok = Tokenizer(ckpt["vocab"])
    idx = torch.tensor([tok.encode(prompt)])  # (1, T); T stays within the block
    with torch.no_grad():
        for _ in range(30):
            idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    greedy = tok.decode(idx[0].tolist()) + "\n"
    rc, two, _ = run_cli(capsys, *args, "--num-samples", "2", "--temperature", "0", "--seed", "7")
    assert rc == 0 and two == greedy + "-" * 40 + "\n" + greedy


def _one_line_error(rc, err, needle):
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinygpt: error:") and needle in lines[0], err


@pytest.mark.parametrize(
    "content,needle",
    [(None, "not found"), (b"", "empty"), (b"\xff\xfe\x00a", "binary"),
     (b"caf\xe9" * 50, "not UTF-8"), (b"short text", "text too short")],
)
def test_bad_data_gives_one_line_error(tmp_path, capsys, content, needle):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    rc, _, err = run_cli(capsys, "train", "--data", str(path), "--device", "cpu",
                         "--out-dir", str(tmp_path / "out"))
    _one_line_error(rc, err, needle)


def test_unknown_preset_and_bad_hyperparameter(tmp_path, capsys, corpus_path):
    rc, _, err = run_cli(capsys, "train", "--preset", "huge", "--data", str(corpus_path))
    _one_line_error(rc, err, "unknown preset 'huge'")
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--n-embd", "130",
                         "--data", str(corpus_path))
    _one_line_error(rc, err, "divisible by n_head")


def test_unknown_prompt_characters(tmp_path, corpus_path, capsys):
    tiny_run(tmp_path, corpus_path, max_iters=1, eval_interval=1)
    rc, _, err = run_cli(capsys, "sample", "--out-dir", str(tmp_path / "out"),
                         "--prompt", "hi \u00e9\u4e2d", "--device", "cpu")
    _one_line_error(rc, err, "'\u00e9', '\u4e2d'")


def test_corrupt_and_truncated_checkpoints(tmp_path, corpus_path, capsys):
    tiny_run(tmp_path, corpus_path, max_iters=1, eval_interval=1)
    good = (tmp_path / "out" / "best.pt").read_bytes()
    cases = {"truncated.pt": good[: len(good) // 2], "garbage.pt": os.urandom(4096),
             "missing.pt": None}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        rc, _, err = run_cli(capsys, "sample", "--ckpt", str(tmp_path / name), "--device", "cpu")
        _one_line_error(rc, err, "not found" if content is None else "corrupt or truncated")


def test_checkpoint_from_newer_format(tmp_path):
    path = tmp_path / "new.pt"
    save_checkpoint(path, {"model_config": {}, "train_config": {}, "model": {}, "iteration": 0,
                           "vocab": "ab"})
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = ckpt_mod.FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(UserError, match="newer"):
        load_checkpoint(path)


def test_checkpoint_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model_config": {}, "train_config": {}, "model": {},
                "iteration": 0, "vocab": "ab", "payload": os.system}, path)
    with pytest.raises(UserError, match=r"holds an object tinygpt does not load \(posix.system\)"):
        load_checkpoint(path)


def test_a_full_disk_keeps_the_previous_checkpoints(tmp_path, capsys, corpus_path):
    """Files may not grow past a third of a checkpoint (RLIMIT_FSIZE: the kernel refuses the
    write with EFBIG, as a full disk does with ENOSPC): the save fails in one line naming the
    file and the reason, and the checkpoints before are untouched, with no debris beside them."""
    tiny_run(tmp_path, corpus_path, max_iters=2, eval_interval=2)
    out = tmp_path / "out"
    before = {name: (out / name).read_bytes() for name in ("best.pt", "last.pt")}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before["last.pt"]) // 3, hard))
    try:
        rc, _, err = run_cli(capsys, "train", "--resume", "--max-iters", "4", "--out-dir",
                             str(out))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    last_line = err.strip().splitlines()[-1]
    _one_line_error(rc, last_line, f"could not write checkpoint {out}/")
    assert last_line.endswith(".pt (File too large); the previous checkpoint there is unchanged")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == [".tinygpt.lock", "best.pt", "last.pt"]


def test_unreadable_inputs_are_one_line(tmp_path, capsys, corpus_path, monkeypatch):
    """A data file the user may not read (root reads anything, so the refusal is simulated where
    the file is read) and a checkpoint that is a directory."""
    secret = tmp_path / "secret.txt"
    secret.write_text("x" * 1000)
    read_bytes = Path.read_bytes

    def denied(path):
        if path == secret:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(secret),
                         "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    _one_line_error(rc, err, f"cannot read data file {secret} (Permission denied)")
    (tmp_path / "out" / "last.pt").mkdir(parents=True)
    rc, _, err = run_cli(capsys, "train", "--resume", "--out-dir", str(tmp_path / "out"))
    _one_line_error(rc, err, f"cannot read checkpoint {tmp_path}/out/last.pt (Is a directory)")


def test_resume_finds_its_data_and_notices_a_change(tmp_path, corpus_path, monkeypatch):
    """A checkpoint names its text (its absolute path and sha256): --resume needs no --data, from
    any directory, and refuses a changed or missing text unless told otherwise."""
    text = tmp_path / "text.txt"
    text.write_bytes(corpus_path.read_bytes())
    monkeypatch.chdir(tmp_path)
    tiny_run(tmp_path, "text.txt", max_iters=2, eval_interval=2)  # --data given relative
    monkeypatch.chdir(tmp_path / "out")
    out = str(tmp_path / "out")
    assert train("cpu-baby", {"out_dir": out, "max_iters": 4}, resume=True,
                 log_interval=1000)["iterations"] == 4
    assert load_checkpoint(tmp_path / "out" / "last.pt")["data"] == {
        "path": str(text.resolve()), "sha256": hashlib.sha256(text.read_bytes()).hexdigest()}
    with text.open("a", encoding="utf-8") as f:  # more of the same characters
        f.write(corpus_path.read_text(encoding="utf-8")[:100])
    with pytest.raises(UserError, match="text.txt is not the text .*/out/last.pt was trained on "
                                        r"\(.*text.txt, sha256 [0-9a-f]{12}\.\.\.\); resume on "
                                        "that text, or pass --new-data"):
        train("cpu-baby", {"out_dir": out, "max_iters": 6}, resume=True)
    assert train("cpu-baby", {"out_dir": out, "max_iters": 6}, data=str(text), resume=True,
                 new_data=True, log_interval=1000)["iterations"] == 6
    text.unlink()
    with pytest.raises(UserError, match="was trained on .*text.txt, which is not there any more"):
        train("cpu-baby", {"out_dir": out, "max_iters": 8}, resume=True)


@pytest.mark.parametrize("how, words", [
    (["--threads", "2"], "(fp32, 2 threads)"),
    ([], "(fp32, 4, 3, 2 or 1 threads, whichever times faster (--threads N fixes the count))"),
    (["OMP_NUM_THREADS"], "(fp32, 2 threads)"),
])
def test_the_start_line_says_how_threads_are_chosen(tmp_path, capsys, corpus_path, monkeypatch,
                                                   how, words):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    if how == ["OMP_NUM_THREADS"]:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by OpenMP at start only: torch keeps 2
        how = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", *how,
                             "--data", str(corpus_path), "--device", "cpu", "--max-iters", "1",
                             "--n-layer", "1", "--eval-iters", "1", "--out-dir",
                             str(tmp_path / "out"))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err
    assert words in err


def test_nan_loss_stops_cleanly(tmp_path, corpus_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(corpus_path),
                         "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                         "--lr", "1e20", "--weight-decay", "0", "--warmup-iters", "0",
                         "--grad-clip", "0",
                         "--max-iters", "50", "--eval-interval", "25", "--eval-iters", "2",
                         "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    _one_line_error(rc, err.strip().splitlines()[-1] + "\n", "not finite")
    assert load_checkpoint(tmp_path / "out" / "best.pt")["iteration"] == 0


KILL_MID_WRITE = """
import os, signal, sys
import torch
from tinygpt import checkpoint
from tinygpt.cli import main

writes = 0
real_save = torch.save

def crash_on_third_write(obj, f):
    # Evaluation at step 0 writes best.pt and last.pt; the third write, at step 5, is torn:
    # some bytes reach the temporary file, then the process dies as if the machine went down.
    global writes
    writes += 1
    if writes < 3:
        return real_save(obj, f)
    f.write(b"PK partial zip")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.torch.save = crash_on_third_write
main(["train", "--preset", "cpu-baby", "--data", sys.argv[1], "--out-dir", sys.argv[2],
      "--device", "cpu", "--n-layer", "1", "--n-embd", "32", "--max-iters", "10",
      "--eval-interval", "5", "--eval-iters", "1"])
"""


def test_training_killed_while_writing_keeps_the_previous_checkpoint(tmp_path, corpus_path,
                                                                      run_command):
    out = tmp_path / "out"
    proc = run_command([sys.executable, "-c", KILL_MID_WRITE, str(corpus_path), str(out)],
                       timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "step 5:" in proc.stderr  # it died writing the second evaluation's checkpoint
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the torn temporary file
    assert load_checkpoint(out / "last.pt")["iteration"] == 0  # the previous one, intact
    resumed = train("cpu-baby", {"out_dir": str(out)}, data=str(corpus_path), resume=True,
                    log_interval=1000)
    assert resumed["iterations"] == 10  # and training goes on from it
    assert sorted(p.name for p in out.iterdir()) == [".tinygpt.lock", "best.pt",
                                                     "last.pt"]  # debris cleared


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_absent_device_is_a_clear_error(tmp_path, capsys, corpus_path, device):
    if (device == "cuda" and torch.cuda.is_available()) or (
            device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"{device} is present here")
    rc, _, err = run_cli(capsys, "train", "--data", str(corpus_path), "--device", device,
                         "--out-dir", str(tmp_path))
    _one_line_error(rc, err, f"--device {device} was requested")


def test_forced_triton_backend_that_cannot_run(tmp_path, capsys, corpus_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc, _, err = run_cli(capsys, "train", "--data", str(corpus_path), "--device", "cpu",
                         "--backend", "triton", "--out-dir", str(tmp_path))
    _one_line_error(rc, err, "backend 'triton' needs a CUDA device")


# Inputs a new user tries: each is refused before training, in one line, with nothing written.
BAD_INPUTS = {
    "head dim no kernel serves": (["--backend", "triton", "--n-embd", "600", "--n-head", "2"],
                                  {}, "head dim 300 is not supported"),
    "batch that cannot fit": (["--batch-size", "1000000", "--block-size", "4096"], {},
                              "lower --batch-size (1000000)"),
    "model that cannot fit": (["--n-embd", "100000"], {}, "--n-embd (100000)"),
    "meta device": (["--device", "meta"], {}, "device 'meta' is not supported"),
    "xpu device": (["--device", "xpu"], {}, "use auto, cpu, cuda, cuda:N or mps"),
    "beta2 nan": (["--beta2", "nan"], {}, "beta2 must be a finite number"),
    "beta1 above 1": (["--beta1", "1.5"], {}, "beta1 must be in [0, 1)"),
    "TINYGPT_BACKEND": ([], {"TINYGPT_BACKEND": "fast"}, "TINYGPT_BACKEND: unknown backend"),
    "TRITON_INTERPRET": (["--backend", "triton"], {"TRITON_INTERPRET": "maybe"},
                         "TRITON_INTERPRET='maybe' is neither on"),
    "RANK not a number": ([], {"RANK": "first", "WORLD_SIZE": "2"}, "RANK='first' is not an"),
    "RANK past WORLD_SIZE": ([], {"RANK": "3", "WORLD_SIZE": "2"}, "do not describe a process"),
}


@pytest.mark.parametrize("argv,env,needle", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_before_training(tmp_path, capsys, corpus_path, monkeypatch, argv,
                                              env, needle):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(corpus_path),
                         *(["--device", "cpu"] if "--device" not in argv else []), *argv,
                         "--out-dir", str(out))
    _one_line_error(rc, err, needle)
    assert not out.exists()


def test_cache_path_that_is_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "cache").write_text("not a directory")
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    rc, _, err = run_cli(capsys, "train", "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    _one_line_error(rc, err, "(from TINYGPT_CACHE) is not a directory")


def _out_of_memory(*args, **kwargs):
    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                       "51539607552 bytes. Error code 12 (Cannot allocate memory)")


def test_out_of_memory_in_the_first_step_writes_nothing(tmp_path, capsys, corpus_path,
                                                        monkeypatch):
    """The step is tried on a batch of zeros before the first evaluation writes checkpoints."""
    monkeypatch.setattr("tinygpt.model.GPT.forward", _out_of_memory)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(corpus_path),
                         "--device", "cpu", "--out-dir", str(out))
    assert err.startswith("tinygpt: preset")  # the start line, then the error
    _one_line_error(rc, err.strip().splitlines()[-1] + "\n",
                    "out of memory on cpu while trying a training step; lower --batch-size (12) "
                    "or --block-size (64), or the model's --n-layer (4) or --n-embd (128) "
                    "(nothing was written)")
    assert not out.exists()


def test_out_of_memory_later_keeps_the_checkpoints(tmp_path, capsys, corpus_path, monkeypatch):
    from tinygpt.train import _Run

    real_step, steps = _Run.step, []

    def third_step_fails(self, it):
        steps.append(it)
        return _out_of_memory() if len(steps) == 3 else real_step(self, it)

    monkeypatch.setattr(_Run, "step", third_step_fails)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(corpus_path),
                         "--device", "cpu", "--n-layer", "1", "--n-embd", "16", "--eval-iters",
                         "1", "--out-dir", str(out))
    _one_line_error(rc, err.strip().splitlines()[-1] + "\n", "while training step 3; lower")
    assert f"the checkpoints in {out}/ are kept" in err
    assert load_checkpoint(out / "last.pt")["iteration"] == 0


def test_checkpoint_vocabulary_must_match_its_embedding(tmp_path, capsys, corpus_path):
    tiny_run(tmp_path, corpus_path, max_iters=1, eval_interval=1)
    path = tmp_path / "out" / "best.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["vocab"] = ckpt["vocab"][:-1]  # one character short of the embedding's rows
    torch.save(ckpt, path)
    rc, _, err = run_cli(capsys, "sample", "--ckpt", str(path), "--device", "cpu")
    _one_line_error(rc, err, "characters in its vocabulary but a model built for")


def test_ctrl_c_finishes_the_step_saves_and_exits(tmp_path, corpus_path, spawn):
    """Through `python -m tinygpt`, as a user's Ctrl-C would arrive (SIGTERM: test_rundir.py)."""
    cmd = [sys.executable, "-m", "tinygpt", "train", "--preset", "cpu-baby",
           "--data", str(corpus_path), "--device", "cpu", "--n-layer", "1", "--n-embd", "32",
           "--max-iters", "100000", "--eval-interval", "100000", "--eval-iters", "1",
           "--log-interval", "1", "--out-dir", str(tmp_path / "out")]
    proc = spawn(cmd, stderr=subprocess.PIPE, text=True,  # even if SIGINT is ignored here
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:  # wait until training steps are running
        if "/100000 loss" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err
    assert load_checkpoint(tmp_path / "out" / "last.pt")["iteration"] >= 1


def test_checkpoint_whose_weights_do_not_fit_its_config(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    state = build_model(cfg).state_dict()
    cfg.n_layer = 3  # the stored config now claims a layer the weights lack
    save_checkpoint(tmp_path / "best.pt", {"model_config": vars(cfg), "train_config": {},
                                           "iteration": 0, "model": state, "vocab": "abcdefghijk"})
    rc, _, err = run_cli(capsys, "sample", "--out-dir", str(tmp_path), "--prompt", "a",
                         "--device", "cpu")
    _one_line_error(rc, err, "weights do not fit the model")
    save_checkpoint(tmp_path / "best.pt", {"model_config": {"n_layers": 2}, "train_config": {},
                                           "iteration": 0, "model": state, "vocab": "ab"})
    rc, _, err = run_cli(capsys, "sample", "--out-dir", str(tmp_path), "--device", "cpu")
    _one_line_error(rc, err, "unreadable model_config")


def test_interrupted_on_an_evaluation_step_resumes_exactly(tmp_path, corpus_path, monkeypatch):
    full = tiny_run(tmp_path / "a", corpus_path, max_iters=20, eval_interval=10, dropout=0.1)
    step = train_mod._Run.step

    def step_then_signal(run, it):  # a SIGTERM right after step 10
        loss = step(run, it)
        if it + 1 == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(train_mod._Run, "step", step_then_signal)
    stopped = tiny_run(tmp_path / "b", corpus_path, max_iters=20, eval_interval=10, dropout=0.1)
    assert stopped["interrupted_by"] == signal.SIGTERM and stopped["iterations"] == 10
    assert [h["iter"] for h in stopped["history"]] == [0]  # stopped before step 10's evaluation
    monkeypatch.undo()
    resumed = train("cpu-baby", {"out_dir": str(tmp_path / "b" / "out")}, data=str(corpus_path),
                    resume=True, log_interval=1000)
    assert [(h["iter"], h["val"]) for h in resumed["history"]] == [
        (h["iter"], h["val"]) for h in full["history"][1:]]
    a = load_checkpoint(tmp_path / "a" / "out" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "out" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv,needle", [
    (["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["train", "--n-layer", "four"], "argument --n-layer: invalid int value: 'four'"),
    (["sample", "--cache", "sometimes"], "argument --cache: invalid choice"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_unknown_option_is_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    _one_line_error(exit_info.value.code, capsys.readouterr().err, needle)


def test_resume_needs_the_training_state(tmp_path, corpus_path):
    vocab = "".join(sorted(set(corpus_path.read_text())))
    cfg = ModelConfig(vocab_size=len(vocab), block_size=16, n_layer=1, n_head=2, n_embd=16,
                      dropout=0.0)
    save_checkpoint(tmp_path / "last.pt", {"model_config": vars(cfg), "train_config": {},
                                           "iteration": 3, "model": build_model(cfg).state_dict(),
                                           "vocab": vocab})
    with pytest.raises(UserError, match="lacks the training state.*optimizer"):
        train("cpu-baby", {"out_dir": str(tmp_path)}, data=str(corpus_path), resume=True)


def test_a_new_run_does_not_clobber_an_old_one(tmp_path, corpus_path, capsys):
    tiny_run(tmp_path, corpus_path, max_iters=2, eval_interval=1)
    before = (tmp_path / "out" / "last.pt").read_bytes()
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(corpus_path),
                         "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    _one_line_error(rc, err, "already holds a run (last.pt, best.pt)")
    assert (tmp_path / "out" / "last.pt").read_bytes() == before
    (tmp_path / "out" / "last.pt").unlink()  # a best.pt alone is a run's result too
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(corpus_path),
                         "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    _one_line_error(rc, err, "already holds a run (best.pt)")
    summary = train("cpu-baby", {**TINY, "max_iters": 1, "eval_interval": 1,
                                 "out_dir": str(tmp_path / "out")},
                    data=str(corpus_path), overwrite=True)
    assert summary["iterations"] == 1
