"""`tinygpt doctor`: the report, its exit status, and its JSON."""

import json
import os
import sys

import pytest
import torch
from tinygpt.kernels import flash_attention as attention_module

from tinygpt import doctor, verify
from tinygpt.cli import main
from tinygpt.config import from_preset

SMALL = ["--preset", "cpu-baby", "--n-layer", "1", "--block-size", "32", "--batch-size", "1"]
OPS = ["attention_qkv (causal)", "attention_qkv (causal, dropout 0.2)", "attention (decoding",
       "add_layer_norm (float32 + float32 -> float32)", "layer_norm (float32 -> float32)"]


@pytest.mark.slow
def test_doctor_runs_end_to_end_on_the_cpu(run_command, tmp_path):
    """As a user runs it, without TRITON_INTERPRET set: the kernels run in the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "doctor.json"
    proc = run_command([sys.executable, "-m", "tinygpt", "doctor", "--device", "cpu", "--json",
                        str(report)], timeout=300, env=env)
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


def stub_steps(monkeypatch, ms: dict[str, float] | Exception) -> list:
    """Every kernel passes its check at once; `time_steps` returns `ms` for each step, or raises
    it. Returns the training configs it was asked to time."""
    check = verify.OpCheck("attention_qkv (causal)", True, "dq", 1.1, 3.0)
    monkeypatch.setattr(verify, "check_kernels", lambda *args: [check])
    timed = []

    def time_steps(model_cfg, cfg, device, amp, backends, compile, rounds, warmup):
        timed.append(cfg)
        if isinstance(ms, Exception):
            raise ms
        return {b: [ms[b]] * rounds for b in backends}

    monkeypatch.setattr(verify, "time_steps", time_steps)
    return timed


def test_the_speed_ratio_is_torchs_time_over_tritons(monkeypatch, capsys, tmp_path):
    """Triton at 4 ms a step against torch's 10 is 2.5x torch, and `auto` takes it; the step
    timed is the preset's, Muon included."""
    timed = stub_steps(monkeypatch, {"torch": 10.0, "triton": 4.0})
    report = tmp_path / "doctor.json"
    assert main(["doctor", "--device", "cpu", *SMALL, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("  triton ") and " ms " in line]
    assert row.split()[1:] == ["4.00", "ms", "8,000", "tokens/s", "2.5x", "torch"]
    assert "clipping, Muon and AdamW, at batch 1 x 32" in out
    rows = {r["backend"]: r for r in json.loads(report.read_text())["speed"]["rows"]}
    assert rows["triton"]["vs_torch"] == 2.5 and rows["torch"]["vs_torch"] == 1.0
    assert [(cfg.optimizer, cfg.batch_size) for cfg in timed] == [("muon", 1)]
    assert doctor.auto_verdict(2.5) == "triton (triton 2.50x torch)"
    assert doctor.auto_verdict(0.8) == "torch (triton 0.80x torch)"


def test_a_step_out_of_memory_is_not_reported_as_a_speed(monkeypatch, capsys):
    stub_steps(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    model_cfg, cfg = from_preset("cpu-baby", n_layer=1, block_size=32, batch_size=1)
    lines = []
    speedup = doctor.Doctor(torch.device("cpu"), model_cfg, cfg, False, True,
                            lines.append).speed(None)
    assert speedup is None and "  not timed: out of memory" in lines
    assert not any("x torch" in line for line in lines)
    assert doctor.auto_verdict(speedup) == ("not known: the training step could not be timed "
                                            "(out of memory)")


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
