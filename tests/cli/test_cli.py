"""The command line: sampling seeded, and bad data, options, devices, backends, paths and
prompts refused in one line before anything runs."""

import math
import random
import re
from pathlib import Path

import pytest
import torch
from runs import one_line_error, run_cli, tiny_run

from tinygpt import corpus
from tinygpt.checkpoint import load_checkpoint
from tinygpt.cli import main
from tinygpt.config import ModelConfig
from tinygpt.data import Tokenizer
from tinygpt.model import build_model


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
    one_line_error(rc, err, needle)


def test_unknown_preset_and_bad_hyperparameter(tmp_path, capsys, corpus_path):
    rc, _, err = run_cli(capsys, "train", "--preset", "huge", "--data", str(corpus_path))
    one_line_error(rc, err, "unknown preset 'huge'")
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--n-embd", "130",
                         "--data", str(corpus_path))
    one_line_error(rc, err, "divisible by n_head")


def test_unknown_prompt_characters(tmp_path, corpus_path, capsys):
    tiny_run(tmp_path, corpus_path, max_iters=1, eval_interval=1)
    rc, _, err = run_cli(capsys, "sample", "--out-dir", str(tmp_path / "out"),
                         "--prompt", "hi \u00e9\u4e2d", "--device", "cpu")
    one_line_error(rc, err, "'\u00e9', '\u4e2d'")


def test_unreadable_inputs_are_one_line(tmp_path, capsys, corpus_path, monkeypatch):
    """A data file the user may not read (root reads anything, so the refusal is simulated where
    the file is opened) and a checkpoint that is a directory."""
    secret = tmp_path / "secret.txt"
    secret.write_text("x" * 1000)

    def denied(path, *args, **kwargs):
        if Path(path) == secret:
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(corpus, "open", denied, raising=False)
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(secret),
                         "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    one_line_error(rc, err, f"cannot read data file {secret} (Permission denied)")
    (tmp_path / "out" / "last.pt").mkdir(parents=True)
    rc, _, err = run_cli(capsys, "train", "--resume", "--out-dir", str(tmp_path / "out"))
    one_line_error(rc, err, f"cannot read checkpoint {tmp_path}/out/last.pt (Is a directory)")


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_absent_device_is_a_clear_error(tmp_path, capsys, corpus_path, device):
    if (device == "cuda" and torch.cuda.is_available()) or (
            device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"{device} is present here")
    rc, _, err = run_cli(capsys, "train", "--data", str(corpus_path), "--device", device,
                         "--out-dir", str(tmp_path))
    one_line_error(rc, err, f"--device {device} was requested")


def test_forced_triton_backend_that_cannot_run(tmp_path, capsys, corpus_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc, _, err = run_cli(capsys, "train", "--data", str(corpus_path), "--device", "cpu",
                         "--backend", "triton", "--out-dir", str(tmp_path))
    one_line_error(rc, err, "backend 'triton' needs a CUDA device")


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
    one_line_error(rc, err, needle)
    assert not out.exists()


def test_cache_path_that_is_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "cache").write_text("not a directory")
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    rc, _, err = run_cli(capsys, "train", "--device", "cpu", "--out-dir", str(tmp_path / "out"))
    one_line_error(rc, err, "(from TINYGPT_CACHE) is not a directory")


@pytest.mark.parametrize("argv,needle", [
    (["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["train", "--n-layer", "four"], "argument --n-layer: invalid int value: 'four'"),
    (["sample", "--cache", "sometimes"], "argument --cache: invalid choice"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_unknown_option_is_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    one_line_error(exit_info.value.code, capsys.readouterr().err, needle)


def test_bytes_train_on_any_file_sample_with_replacements_and_resume_as_bytes(tmp_path, capsys):
    """A file that is not text trains with --tokenizer bytes; its samples show the bytes that are
    not UTF-8 as U+FFFD, never a traceback; the checkpoint keeps the tokenizer and the split."""
    data = tmp_path / "any.bin"
    data.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(20_000)))
    out = str(tmp_path / "out")
    train = ["train", "--preset", "cpu-baby", "--data", str(data), "--device", "cpu",
             "--out-dir", out, "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
             "--n-layer", "1", "--block-size", "16", "--batch-size", "2"]
    rc, _, err = run_cli(capsys, *train, "--tokenizer", "bytes")
    assert rc == 0 and "(20,000 bytes, vocab 256)" in err, err
    found = re.search(r"step 2: train loss [\d.]+, val loss (\d+\.\d{4}) "
                      r"\((\d+\.\d{3}) bits/byte\)", err)
    assert found and float(found[2]) == pytest.approx(float(found[1]) / math.log(2), abs=1e-3), err
    rc, text, err = run_cli(capsys, "sample", "--out-dir", out, "--prompt", "é",
                            "--max-new-tokens", "200", "--device", "cpu")
    assert rc == 0 and text.startswith("é") and "\ufffd" in text and "sampled 200 bytes" in err
    rc, _, err = run_cli(capsys, "train", "--resume", "--out-dir", out, "--tokenizer", "chars")
    one_line_error(rc, err, "--tokenizer chars differs from the checkpoint's bytes")
    rc, _, err = run_cli(capsys, "train", "--resume", "--out-dir", out, "--split", "0.8,0.2")
    one_line_error(rc, err, "--split 0.8,0.2 differs from the checkpoint's 0.9,0.1; a resumed "
                   "run keeps the text it holds out for validation")
    rc, _, err = run_cli(capsys, "train", "--resume", "--out-dir", out, "--max-iters", "3")
    assert rc == 0 and "resuming" in err and "bytes, vocab 256" in err, err


def test_eval_scores_the_whole_split_once_and_says_when_there_is_no_test_part(
        tmp_path, corpus_path, capsys):
    tiny_run(tmp_path, corpus_path, max_iters=2, eval_interval=2)
    step_line = r"step 2: .*, val loss [\d.]+ \(\d+\.\d{3} bits/char\)"
    assert re.search(step_line, capsys.readouterr().err)
    out = str(tmp_path / "out")
    rc, text, _ = run_cli(capsys, "eval", "--out-dir", out, "--device", "cpu",
                          "--batch-size", "64")
    n = len(corpus_path.read_text(encoding="utf-8"))
    val = n - int(0.9 * n)
    found = re.fullmatch(r"val: loss (\d+\.\d{4}), (\d+\.\d{4}) bits per character "
                         r"\(([\d,]+) characters scored in windows of 32, [\d.]+ s\)\n", text)
    assert rc == 0 and found, text
    assert int(found[3].replace(",", "")) == val - 1
    assert float(found[2]) == pytest.approx(float(found[1]) / math.log(2), abs=2e-4)
    rc, _, err = run_cli(capsys, "eval", "--out-dir", out, "--device", "cpu", "--split", "test")
    one_line_error(rc, err, "the test split of")
    rc, _, err = run_cli(capsys, "eval", "--out-dir", out, "--batch-size", "0")
    one_line_error(rc, err, "--batch-size must be at least 1, got 0")
