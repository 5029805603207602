"""The memory check's estimate against what a training step really keeps for its backward pass,
and running out of memory ending in one line that says what was kept."""

import contextlib
import os
from pathlib import Path

import pytest
import torch
from runs import one_line_error, run_cli

from tinygpt import memory
from tinygpt.checkpoint import load_checkpoint
from tinygpt.config import ModelConfig, TrainConfig
from tinygpt.model import GPT
from tinygpt.optim import make_optimizer


def saved_for_backward(model: GPT, batch: int, autocast: torch.dtype | None) -> int:
    """Bytes of the activations a training forward pass saves for backward: distinct storages,
    without the parameters and their autocast copies (tensors of a parameter's shape)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {p.shape for p in model.parameters()}
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in params and t.shape not in shapes:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    idx = torch.randint(0, model.config.vocab_size, (batch, model.config.block_size))
    amp = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(idx, idx)
    return sum(storages.values())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_the_estimate_is_a_lower_bound_that_autocast_lowers(dropout):
    """A run is refused when the estimate exceeds the free memory, so it must not count more than
    a step keeps: in fp32 or under 16-bit autocast (2 bytes a value, not 4), whose estimate is the
    lower one, as what it keeps is. Nor may it be so low that the check never refuses."""
    cfg = ModelConfig(vocab_size=37, block_size=29, n_layer=3, n_head=2, n_embd=48,
                      dropout=dropout)
    model = GPT(cfg, backend="torch")
    fixed = cfg.num_params() * memory.BYTES_PER_PARAM  # weights, gradients, AdamW's moments
    estimate, kept = {}, {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        estimate[name] = memory.training_bytes(cfg, 3, autocast=dtype is not None) - fixed
        kept[name] = saved_for_backward(model, 3, dtype)
        assert kept[name] / 4 <= estimate[name] <= kept[name], (name, estimate[name], kept[name])
    assert estimate["bf16"] < estimate["fp32"] and kept["bf16"] < kept["fp32"]


def test_muon_needs_less_than_adamw_by_what_its_state_saves():
    """Muon keeps one momentum where AdamW keeps two moments: the estimates differ by the bytes
    the two optimizers' states differ by after a step."""
    cfg = ModelConfig(vocab_size=37, block_size=29, n_layer=3, n_head=2, n_embd=48, bias=True)
    model = GPT(cfg, backend="torch")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    state = {}
    for optimizer in ("adamw", "muon"):
        optimizers = make_optimizer(model, TrainConfig(optimizer=optimizer), torch.device("cpu"))
        optimizers.step()
        state[optimizer] = sum(t.nbytes for part in optimizers.parts.values()
                               for s in part.state.values() for t in s.values() if t.dim())
    estimate = {o: memory.training_bytes(cfg, 3, autocast=False, optimizer=o)
                for o in state}
    assert estimate["adamw"] - estimate["muon"] == state["adamw"] - state["muon"] > 0


def _out_of_memory(*args, **kwargs):
    raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                       "51539607552 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads Linux's /proc/meminfo")
def test_free_memory_on_the_cpu_is_counted_in_bytes():
    """MemAvailable, which /proc/meminfo gives in KiB, lies between the free pages and all of
    the machine's memory, as the C library counts them in bytes."""
    page = os.sysconf("SC_PAGE_SIZE")
    free_pages, total = os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    available = memory.free_bytes(torch.device("cpu"))
    assert free_pages / 2 <= available <= total, (free_pages, available, total)


def test_out_of_memory_in_the_first_step_writes_nothing(tmp_path, capsys, corpus_path,
                                                        monkeypatch):
    """The step is tried on a batch of zeros before the first evaluation writes checkpoints."""
    monkeypatch.setattr("tinygpt.model.GPT.forward", _out_of_memory)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "train", "--preset", "cpu-baby", "--data", str(corpus_path),
                         "--device", "cpu", "--out-dir", str(out))
    assert err.startswith("tinygpt: preset")  # the start line, then the error
    one_line_error(rc, err.strip().splitlines()[-1] + "\n",
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
    one_line_error(rc, err.strip().splitlines()[-1] + "\n", "while training step 3; lower")
    assert f"the checkpoints in {out}/ are kept" in err
    assert load_checkpoint(out / "last.pt")["iteration"] == 0
