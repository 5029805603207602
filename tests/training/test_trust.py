"""Runs trust the Triton kernels only after checking them, and `auto` only where they are faster.

The product checks on CUDA alone; these tests add the CPU to `trust.CHECKED_DEVICES`, so that the
same code runs on the kernels in Triton's interpreter. Timings are stubbed where a test is about
the choice, not the clock.
"""

import dataclasses
import json
import shutil

import pytest
import torch
import triton
from tinygpt.kernels import flash_attention as attention_module

from tinygpt import ops, trust, verify
from tinygpt.checkpoint import load_checkpoint
from tinygpt.cli import main
from tinygpt.config import ModelConfig, TrainConfig
from tinygpt.errors import UserError
from tinygpt.train import train

CPU = torch.device("cpu")
CFG = ModelConfig(vocab_size=11, block_size=37, n_layer=1, n_head=2, n_embd=48, dropout=0.0)
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, dropout=0.0,
            eval_iters=1, max_iters=2, eval_interval=2, device="cpu")


@pytest.fixture
def checked(tmp_path, monkeypatch):
    """A fresh cache, the CPU checked like a GPU; returns the cache's folder of verdicts."""
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYGPT_BACKEND", raising=False)
    monkeypatch.setattr(trust, "CHECKED_DEVICES", ("cuda", "cpu"))
    return tmp_path / "cache" / "kernel-checks"


def counted(monkeypatch, real: bool = True) -> list:
    """The shapes `verify.check_kernels` is called at, from now on; each check run on the
    kernels, or (not `real`, for tests of the cache alone) a verdict that they passed."""
    calls, check = [], verify.check_kernels
    passed = [verify.OpCheck("attention_qkv (causal)", True, "dq", 1.1, 3.0)]

    def counting(shape, *args):
        calls.append(shape)
        return check(shape, *args) if real else passed

    monkeypatch.setattr(verify, "check_kernels", counting)
    return calls


def settle(said=None, cfg=CFG, batch=1, explicit=False, by_speed=False, optimizer="adamw"
           ) -> trust.Choice:
    said = [] if said is None else said
    run = TrainConfig(batch_size=batch, optimizer=optimizer)
    return trust.settle("triton", CPU, cfg, run, None, explicit=explicit, by_speed=by_speed,
                        say=said.append)


def wrong_dk(monkeypatch) -> None:
    """The attention backward writes dK 1% too large."""
    launch = attention_module._launch_backward

    def scaled(*args):
        launch(*args)
        args[-2].mul_(1.01)

    monkeypatch.setattr(attention_module, "_launch_backward", scaled)


def stub_checks(monkeypatch, passed=True) -> None:
    check = verify.OpCheck("attention_qkv (causal)", passed, "dq", 1.1 if passed else 50.0, 3.0)
    monkeypatch.setattr(verify, "check_kernels", lambda *args: [check])


def stub_timing(monkeypatch, triton_ms: float, torch_ms: float) -> list:
    calls = []

    def time_steps(model_cfg, cfg, device, amp, backends, *args):
        calls.append((backends, cfg.optimizer))
        return {"triton": [triton_ms] * 3, "torch": [torch_ms] * 3}

    monkeypatch.setattr(verify, "time_steps", time_steps)
    return calls


def test_a_cached_pass_skips_the_check(checked, monkeypatch):
    calls, said = counted(monkeypatch), []
    assert settle(said) == trust.Choice("triton", "verified on cpu (Triton's interpreter)")
    assert len(calls) == 1 and "checking the Triton kernels" in said[0]
    assert said[1].startswith("the kernels passed in ") and len(said) == 2
    assert len(list(checked.glob("*.json"))) == 1
    said.clear()
    assert settle(said).backend == "triton"
    assert len(calls) == 1 and said == []


def test_a_changed_kernel_source_triton_version_or_shape_misses_the_cache(
        checked, monkeypatch, tmp_path):
    sources = tmp_path / "kernels"
    shutil.copytree(trust.KERNEL_SOURCES, sources, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(trust, "KERNEL_SOURCES", sources)
    calls = counted(monkeypatch, real=False)
    settle()
    settle()
    assert len(calls) == 1
    with open(sources / "flash_attention.py", "a") as f:
        f.write("# a changed kernel\n")
    settle()
    assert len(calls) == 2
    monkeypatch.setattr(triton, "__version__", "9.9.9")
    settle()
    assert len(calls) == 3
    settle(batch=2)
    assert len(calls) == 4 and calls[-1].batch == 2
    settle(batch=2)
    assert len(calls) == 4 and len(list(checked.glob("*.json"))) == 4


def test_a_model_with_biases_or_dropout_is_checked_apart(checked, monkeypatch):
    """The kernels run other code with biases (the LayerNorm's) and with dropout (attention's
    mask): a verdict for the model without them says nothing of the model with them."""
    shapes = counted(monkeypatch, real=False)
    settle()
    settle(cfg=dataclasses.replace(CFG, bias=True))
    settle(cfg=dataclasses.replace(CFG, dropout=0.1))
    settle(cfg=dataclasses.replace(CFG, bias=True))
    assert [(s.bias, s.dropout) for s in shapes] == [(False, 0.0), (True, 0.0), (False, 0.1)]
    assert len(list(checked.glob("*.json"))) == 3


@pytest.mark.parametrize("content", ["{not json", '{"key": {}, "result": {}}', "",
                                     "corrupt-verdict"])
def test_a_corrupt_or_foreign_cache_entry_is_measured_again(checked, monkeypatch, content):
    calls = counted(monkeypatch, real=False)
    settle()
    (path,) = checked.glob("*.json")
    entry = json.loads(path.read_text())
    if content == "corrupt-verdict":  # the right key, a verdict of the wrong type
        entry["result"]["passed"] = "yes"
        content = json.dumps(entry)
    path.write_text(content)
    assert settle().backend == "triton"
    assert len(calls) == 2 and json.loads(path.read_text()) == entry | {
        "result": {**entry["result"], "passed": True}}


def test_an_unwritable_cache_costs_only_the_remeasuring(checked, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("TINYGPT_CACHE", str(blocker))
    calls, said = counted(monkeypatch, real=False), []
    assert settle(said).backend == "triton"
    assert any(line.startswith(f"could not cache the result in {blocker}") for line in said)
    settle()
    assert len(calls) == 2


def test_a_failing_kernel_under_auto_means_torch_and_one_line(checked, monkeypatch):
    wrong_dk(monkeypatch)
    timings = stub_timing(monkeypatch, 1.0, 2.0)
    said = []
    choice = settle(said, by_speed=True)
    assert choice.backend == "torch" and "failed their check" in choice.why
    (line,) = said[1:]  # after "checking the Triton kernels ..."
    assert line.startswith("the Triton kernels failed their check on cpu (Triton's interpreter) "
                           "(attention_qkv (causal): worst dk ")
    assert "x torch's error (limit 3x)); using the torch backend instead" in line
    assert "`tinygpt doctor`" in line and timings == []
    said.clear()
    assert settle(said, by_speed=True).backend == "torch"  # the cached failure
    assert len(said) == 1 and "failed their check" in said[0]


def test_a_failing_kernel_refuses_an_explicit_triton(checked, monkeypatch):
    wrong_dk(monkeypatch)
    with pytest.raises(UserError, match=r"backend 'triton': the kernels failed their check on "
                                        r"cpu .*attention_qkv \(causal\): worst dk .*--backend "
                                        r"torch"):
        settle(explicit=True)


@pytest.mark.parametrize("triton_ms,torch_ms,backend,why", [
    (10.0, 13.1, "triton", "verified on cpu (Triton's interpreter), 1.31x torch at this shape"),
    (10.0, 10.0, "triton", "verified on cpu (Triton's interpreter), 1.00x torch at this shape"),
    (13.0, 10.0, "torch", "triton verified on cpu (Triton's interpreter) but 1.30x slower than "
                          "torch at this shape"),
])
def test_auto_takes_the_faster_backend(checked, monkeypatch, triton_ms, torch_ms, backend, why):
    stub_checks(monkeypatch)
    timings = stub_timing(monkeypatch, triton_ms, torch_ms)
    said = []
    assert settle(said, by_speed=True) == trust.Choice(backend, why)
    assert said[-1].endswith(f"{triton_ms:.2f} ms a step on triton, {torch_ms:.2f} ms on torch")
    assert settle(by_speed=True) == trust.Choice(backend, why)
    assert len(timings) == 1  # the second run read the cache
    assert settle(by_speed=True, batch=3).backend == backend and len(timings) == 2


def test_only_a_new_auto_run_is_timed(checked, monkeypatch):
    stub_checks(monkeypatch)
    timings = stub_timing(monkeypatch, 20.0, 10.0)
    assert settle(explicit=True).backend == "triton"
    assert settle().backend == "triton"  # a resumed run's own
    assert timings == []


def test_auto_times_the_runs_own_optimizers(checked, monkeypatch):
    """A Muon run is timed stepping Muon, and its timing is not an AdamW run's."""
    stub_checks(monkeypatch)
    timings = stub_timing(monkeypatch, 10.0, 20.0)
    settle(by_speed=True, optimizer="muon")
    settle(by_speed=True, optimizer="adamw")
    settle(by_speed=True, optimizer="muon")
    assert [optimizer for _, optimizer in timings] == ["muon", "adamw"]


def test_nothing_is_checked_off_the_checked_devices_or_without_kernels(checked, monkeypatch):
    calls = counted(monkeypatch)
    assert settle(cfg=ModelConfig(model="bigram", vocab_size=11)).backend == "triton"
    assert trust.settle("torch", CPU, CFG, TrainConfig(batch_size=1), None, explicit=False,
                        by_speed=True,
                        say=print).backend == "torch"
    monkeypatch.setattr(trust, "CHECKED_DEVICES", ("cuda",))
    assert settle().backend == "triton"
    assert calls == []


# --- through `train` ----------------------------------------------------------------------------


def test_training_refuses_triton_kernels_that_fail_their_check(checked, monkeypatch, tmp_path,
                                                               small_text_file):
    wrong_dk(monkeypatch)
    with pytest.raises(UserError, match="backend 'triton': the kernels failed their check"):
        train("cpu-baby", {**TINY, "backend": "triton", "out_dir": str(tmp_path / "out")},
              data=str(small_text_file))
    assert not (tmp_path / "out" / "last.pt").exists()


def test_auto_trains_on_torch_when_the_kernels_fail(checked, monkeypatch, tmp_path, capsys,
                                                    small_text_file):
    """As on a CUDA GPU, where `auto` resolves to triton: the check fails, the run goes on with
    the torch backend, says so once, and its checkpoint records torch."""
    resolve = ops.resolve_backend
    monkeypatch.setattr(ops, "resolve_backend", lambda requested, device, shape=None: (
        "triton" if requested == "auto" else resolve(requested, device, shape)))
    wrong_dk(monkeypatch)
    summary = train("cpu-baby", {**TINY, "out_dir": str(tmp_path / "out")},
                    data=str(small_text_file))
    err = capsys.readouterr().err
    assert summary["model"].backend == "torch"
    assert err.count("failed their check") == 2  # the one line, and the start line's reason
    assert "| backend torch (the Triton kernels failed their check on cpu" in err
    assert load_checkpoint(tmp_path / "out" / "last.pt")["backend"] == "torch"


def test_a_resumed_run_keeps_its_backend(checked, monkeypatch, tmp_path, capsys,
                                         small_text_file):
    out = str(tmp_path / "out")
    monkeypatch.setenv("TINYGPT_BACKEND", "reference")  # replaces auto for the first run
    train("cpu-baby", {**TINY, "out_dir": out}, data=str(small_text_file))
    assert load_checkpoint(tmp_path / "out" / "last.pt")["backend"] == "reference"
    monkeypatch.delenv("TINYGPT_BACKEND")
    capsys.readouterr()
    resumed = train("cpu-baby", {"out_dir": out, "max_iters": 4}, resume=True)
    assert resumed["model"].backend == "reference"
    assert "| backend reference (kept from the checkpoint)" in capsys.readouterr().err
    torch_run = train("cpu-baby", {"out_dir": out, "max_iters": 6, "backend": "torch"},
                      resume=True)
    assert torch_run["model"].backend == "torch"  # an explicit --backend wins


def test_a_checkpoint_naming_an_unknown_backend_is_refused(tmp_path, small_text_file):
    train("cpu-baby", {**TINY, "backend": "torch", "out_dir": str(tmp_path)},
          data=str(small_text_file))
    path = tmp_path / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "backend": "cuda-magic"}, path)
    with pytest.raises(UserError, match="names an unknown backend .'cuda-magic'."):
        load_checkpoint(path)


def test_sampling_refuses_triton_kernels_that_fail_their_check(checked, monkeypatch, tmp_path,
                                                               capsys, small_text_file):
    train("cpu-baby", {**TINY, "backend": "torch", "out_dir": str(tmp_path)},
          data=str(small_text_file))
    argv = ["sample", "--out-dir", str(tmp_path), "--device", "cpu", "--max-new-tokens", "5",
            "--backend", "triton"]
    assert main(argv) == 0  # checked once, cached
    wrong_dk(monkeypatch)
    monkeypatch.setattr(trust, "source_hash", lambda: "a kernel changed since")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tinygpt: error: backend 'triton': the kernels failed their check")
