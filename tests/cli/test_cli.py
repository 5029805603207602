"""The command line: sampling seeded, and bad data, options, devices, backends, paths and
prompts refused in one line before anything runs."""

from pathlib import Path

import pytest
import torch
from runs import one_line_error, run_cli, tiny_run

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
