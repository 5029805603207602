"""`tinygpt doctor`: the report, its exit status, and its JSON."""

import importlib
import json
import os
import sys

import pytest

from tinygpt.cli import main

attention_module = importlib.import_module("tinygpt.kernels.attention")

SMALL = ["--preset", "cpu-baby", "--n-layer", "1", "--block-size", "32", "--batch-size", "1"]
OPS = ["attention_qkv (causal)", "attention_qkv (causal, dropout 0.2)", "attention (decoding",
       "add_layer_norm (float32 + float32 -> float32)", "layer_norm (float32 -> float32)"]


def test_doctor_runs_end_to_end_on_the_cpu(run_command, tmp_path):
    """As a user runs it, without TRITON_INTERPRET set: the kernels run in the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "doctor.json"
    proc = run_command([sys.executable, "-m", "tinygpt", "doctor", "--device", "cpu", "--json",
                        str(report)], timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "the kernels run in Triton's interpreter, at small shapes" in out
    assert "auto      torch: the Triton kernels run on CUDA GPUs only" in out
    for op in OPS:
        assert out.count(f"pass  {op}") == 3, op  # the training shape and two odd ones
    assert "FAIL" not in out and "every fused op passed its check" in out
    assert "they are not a speed" in out
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["model"]["n_layer"] == 4
    assert [c["shape"] for c in data["correctness"]] == [
        "B=2 T=64 H=4 D=32 N=128 float32", "B=1 T=37 H=2 D=24 N=48 float32",
        "B=1 T=23 H=3 D=40 N=120 float32"]
    assert all(len(c["checks"]) == 5 for c in data["correctness"])
    assert [(r["backend"], r["compile"]) for r in data["speed"]["rows"]] == [
        ("torch", False), ("triton", False)]
    assert all(len(r["steps_ms"]) == data["speed"]["rounds"] for r in data["speed"]["rows"])


def test_a_wrong_kernel_exits_1_naming_it(monkeypatch, capsys, tmp_path):
    launch = attention_module._launch_backward

    def wrong_dk(*args):
        launch(*args)
        args[-2].mul_(1.01)

    monkeypatch.setattr(attention_module, "_launch_backward", wrong_dk)
    report = tmp_path / "doctor.json"
    assert main(["doctor", "--device", "cpu", *SMALL, "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL  attention_qkv (causal): worst dk") == 3
    assert out.count("pass  add_layer_norm") == 3
    assert "FAILED: a fused op is wrong on this machine" in out
    data = json.loads(report.read_text())
    failed = [c for shape in data["correctness"] for c in shape["checks"] if not c["passed"]]
    assert data["passed"] is False and failed
    assert all(c["ratio"] > c["limit"] for c in failed)


def test_without_the_interpreter_the_kernels_are_not_checked(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["doctor", "--device", "cpu", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "not checked: off CUDA the kernels run only in Triton's interpreter" in out
    assert "triton: not timed" in out and "  torch  " in out


@pytest.mark.parametrize("argv,needle", [
    (["--json", "/nonexistent/dir/report.json"], "/nonexistent/dir is not a directory"),
    (["--n-head", "5"], "n_embd (128) must be divisible by n_head (5)"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_mistakes_are_one_line(capsys, argv, needle):
    device = [] if "--device" in argv else ["--device", "cpu"]
    assert main(["doctor", *device, *SMALL, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tinygpt: error:") and needle in err, err
