"""The GPT on the triton backend against the torch backend: logits, gradients, loss curves.

On the CPU the Triton kernels run in the interpreter, so the model here is tiny; on CUDA the same
tests run compiled kernels.
"""

import pytest
import torch

from tinygpt.config import ModelConfig
from tinygpt.model import GPT, LayerNorm
from tinygpt.train import train

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny(dropout=0.0, **kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=37, block_size=29, n_layer=2, n_head=2, n_embd=32,
                                 dropout=dropout, bias=True), **kw})


def twin_models(cfg):
    torch.manual_seed(0)
    fast = GPT(cfg, backend="triton").to(DEVICE)
    slow = GPT(cfg, backend="torch").to(DEVICE)
    slow.load_state_dict(fast.state_dict())
    return fast, slow


@pytest.mark.parametrize("n_embd,n_head", [(32, 2), (48, 2), (96, 2)], ids=["D16", "D24", "D48"])
def test_logits_and_every_gradient_match(n_embd, n_head):
    fast, slow = twin_models(tiny(n_embd=n_embd, n_head=n_head))
    idx, targets = torch.randint(0, 37, (2, 3, 29), device=DEVICE)
    logits_f, loss_f = fast(idx, targets)
    logits_s, loss_s = slow(idx, targets)
    torch.testing.assert_close(logits_f, logits_s, atol=2e-5, rtol=1e-4)
    loss_f.backward()
    loss_s.backward()
    for (name, p_f), p_s in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p_f.grad, p_s.grad, atol=2e-5, rtol=1e-3, msg=name)


def test_logits_and_every_gradient_match_under_bf16_autocast():
    """The triton LayerNorms hand the next Linear bf16 directly, the residual stream staying
    fp32; torch's hand it fp32, which the Linear casts: the same numbers, so only bf16 matmul
    noise may separate the two. On the CPU, autocast in bf16 runs the kernels in the
    interpreter (conftest.py makes its bf16 dots exact)."""
    cuda = DEVICE == "cuda"
    fast, slow = twin_models(tiny(n_embd=384, n_head=6) if cuda else tiny(n_embd=64))
    idx, targets = torch.randint(0, 37, (2, 8 if cuda else 2, 29), device=DEVICE)
    grads, dtypes = {}, {}
    for name, model in (("triton", fast), ("torch", slow)):
        seen = dtypes[name] = set()
        for module in model.modules():
            if isinstance(module, LayerNorm):
                module.register_forward_hook(
                    lambda module, args, out, seen=seen: seen.add((out[0].dtype, out[1].dtype)))
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits, loss = model(idx, targets)
        loss.backward()
        grads[name] = [logits.float()] + [p.grad for p in model.parameters()]
    assert dtypes == {"triton": {(torch.bfloat16, torch.float32)},
                      "torch": {(torch.float32, torch.float32)}}
    for g_f, g_s in zip(grads["triton"], grads["torch"]):
        scale = g_s.abs().max().item()
        assert (g_f - g_s).abs().max().item() <= 0.05 * scale


@pytest.mark.slow
def test_loss_curves_match_over_training():
    losses = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = GPT(tiny(), backend=backend).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(1)
        curve = []
        for _ in range(15):
            # learnable sequences: counting up mod 37 from random starts
            start = torch.randint(0, 37, (4, 1), generator=gen)
            idx = ((start + torch.arange(30)) % 37).to(DEVICE)  # (4, 30)
            _, loss = model(idx[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[backend] = torch.tensor(curve)
    assert losses["torch"][-5:].mean() < losses["torch"][0] - 0.3  # it learned something
    torch.testing.assert_close(losses["triton"], losses["torch"], atol=2e-3, rtol=1e-3)


def test_dropout_runs_in_the_kernel_and_trains():
    """With the model's own dropout layers switched off, the attention kernel's dropout alone makes
    training-mode losses random (drawn from torch's seed), eval-mode logits fixed, and five AdamW
    steps still lower the loss."""
    fast, _ = twin_models(tiny(dropout=0.3, n_layer=1))
    for module in fast.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    idx, targets = torch.randint(0, 37, (2, 2, 29), device=DEVICE)
    torch.manual_seed(5)
    a = fast(idx, targets)[1]
    torch.manual_seed(5)
    b = fast(idx, targets)[1]
    c = fast(idx, targets)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    optimizer = torch.optim.AdamW(fast.parameters(), lr=3e-2)
    losses = []
    for _ in range(5):
        loss = fast(idx, targets)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    fast.eval()
    torch.testing.assert_close(fast(idx)[0], fast(idx)[0], rtol=0, atol=0)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU path of the command line")
def test_train_command_on_the_triton_backend(tmp_path, small_text_file, capsys):
    summary = train("cpu-baby", dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
                                     max_iters=3, eval_interval=3, eval_iters=1, device="cpu",
                                     backend="triton", out_dir=str(tmp_path)),
                    data=str(small_text_file))
    assert summary["steps"] == 3
    assert "backend triton" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_model_traces_as_one_graph(backend):
    """torch.compile(fullgraph=True) fails on any graph break, e.g. an untraceable kernel call;
    the compiled model's logits are the reference backend's. On the CPU only dynamo's tracing
    runs (backend="eager"); on CUDA, inductor compiles it."""
    cfg = tiny(dropout=0.1)
    torch.manual_seed(0)
    model = GPT(cfg, backend=backend).to(DEVICE)
    reference = GPT(cfg, backend="reference").to(DEVICE).eval()
    reference.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor" if DEVICE == "cuda" else "eager",
                             fullgraph=True)
    idx = torch.randint(0, 37, (2, 29), device=DEVICE)
    _, loss = compiled(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    torch.testing.assert_close(compiled(idx)[0], reference(idx)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU path of the command line")
def test_train_command_with_compile(tmp_path, small_text_file):
    """A compiled model under both optimizers (Muon for its matrices): the optimizers step the
    parameters the compiled module shares with the model."""
    summary = train("cpu-baby", dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
                                     max_iters=2, eval_interval=2, eval_iters=1, device="cpu",
                                     backend="torch", compile=True, optimizer="muon",
                                     out_dir=str(tmp_path)),
                    data=str(small_text_file))
    assert summary["steps"] == 2 and (tmp_path / "best.pt").is_file()
    torch.manual_seed(1337)  # the preset's seed: the run's initial weights
    start = GPT(summary["model"].config)
    for name in ("blocks.0.mlp.fc.weight", "tok_emb.weight"):  # Muon's, AdamW's
        assert not torch.equal(summary["model"].get_parameter(name), start.get_parameter(name))


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="compiled Triton kernels need CUDA")
def test_train_command_with_compile_on_the_triton_backend(tmp_path, small_text_file, capsys):
    """Training steps of the model under torch.compile on the fused kernels, bf16 autocast: the
    losses of eager's steps (dropout 0, so both runs draw the same numbers), up to bf16 noise."""
    runs = {}
    for use_compile in (False, True):
        summary = train("shakespeare-char", dict(
            n_layer=2, batch_size=8, dropout=0.0, lr=3e-3, max_iters=4, eval_interval=2,
            eval_iters=2, device="cuda", backend="triton", compile=use_compile,
            out_dir=str(tmp_path / str(use_compile))), data=str(small_text_file))
        assert summary["steps"] == 4
        runs[use_compile] = [(e["train"], e["val"]) for e in summary["history"]]
    assert "backend triton + compile" in capsys.readouterr().err
    assert len(runs[True]) == len(runs[False]) >= 2
    for compiled, eager in zip(runs[True], runs[False]):
        assert compiled == pytest.approx(eager, abs=0.02)


def test_compile_with_interpreted_triton_is_refused(tmp_path, small_text_file, monkeypatch):
    from tinygpt.errors import UserError

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the CPU path, also on a CUDA machine

    with pytest.raises(UserError, match="--compile with the triton backend needs CUDA"):
        train("cpu-baby", dict(device="cpu", backend="triton", compile=True, out_dir=str(tmp_path)),
              data=str(small_text_file))


@pytest.mark.parametrize("backend,stacks", [("triton", False), ("torch", True)])
def test_backward_writes_the_qkv_gradient_without_a_stack(backend, stacks):
    """The fused backward writes the gradient of the (B, T, 3, H, D) projection in place; the
    torch backend's three views are stacked back by autograd (which shows the check can fail)."""
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.1), backend=backend).to(DEVICE)
    idx = torch.randint(0, 37, (2, 29), device=DEVICE)
    _, loss = model(idx, idx)
    with torch.profiler.profile() as prof:
        loss.backward()
    names = {event.name for event in prof.events()}
    assert ("aten::stack" in names) == stacks
