"""The optimizers: Muon held to torch.optim.Muon and to its math in float64, which parameters each
optimizer takes, and one schedule driving both at their own peak rates."""

import math

import pytest
import torch

from tinygpt.config import ModelConfig, TrainConfig
from tinygpt.model import GPT
from tinygpt.optim import NS_COEFFICIENTS, Muon, lr_at, make_optimizer, orthogonalize

# Odd sizes, tall, wide and square, and shapes that repeat, so that a batch holds several.
SHAPES = [(45, 13), (13, 13), (13, 51), (45, 13), (7, 29), (13, 51), (45, 13)]


def reference_step(p, g, buf, lr, weight_decay, momentum, nesterov):
    """Muon's step on one float64 matrix, written out: momentum, Newton-Schulz, decay, step."""
    buf = momentum * buf + (1 - momentum) * g
    update = g + momentum * (buf - g) if nesterov else buf
    tall = p.shape[0] > p.shape[1]
    x = update.T if tall else update
    x = x / x.norm().clamp_min(1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    update = x.T if tall else x
    p = p * (1 - lr * weight_decay) - lr * math.sqrt(max(1, p.shape[0] / p.shape[1])) * update
    return p, buf


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_is_torch_muon_batched(nesterov):
    """Four steps on fresh gradients: each parameter at most 2x as far from the float64 math as
    torch.optim.Muon's, whose Newton-Schulz runs in bf16 too, and the momentum the same."""
    torch.manual_seed(0)
    start = [torch.randn(s) for s in SHAPES]
    ours, theirs = ([p.clone() for p in start] for _ in range(2))
    exact = [p.double() for p in start]
    bufs = [torch.zeros_like(p) for p in exact]
    settings = dict(lr=0.03, weight_decay=0.2, momentum=0.9, nesterov=nesterov)
    opt = Muon(ours, **settings)
    torch_opt = torch.optim.Muon(theirs, **settings)
    for _ in range(4):
        grads = [torch.randn(s) * 10 ** torch.empty(()).uniform_(-3, 1) for s in SHAPES]
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        opt.step()
        torch_opt.step()
        for i, g in enumerate(grads):
            exact[i], bufs[i] = reference_step(exact[i], g.double(), bufs[i], **settings)
    for i, shape in enumerate(SHAPES):
        error = (ours[i].double() - exact[i]).abs().max().item()
        torch_error = (theirs[i].double() - exact[i]).abs().max().item()
        assert error <= 2 * torch_error + 1e-7, (shape, error, torch_error)
        assert torch_error < 0.1 * settings["lr"]  # bf16's error: the reference is torch's math
        torch.testing.assert_close(opt.state[ours[i]]["momentum_buffer"],
                                   torch_opt.state[theirs[i]]["momentum_buffer"])


@pytest.mark.parametrize("shape", [(64, 16), (16, 16), (9, 40)])
def test_orthogonalize_keeps_singular_vectors_and_takes_values_near_one(shape):
    """Singular values spread over two decades come out between 0.6 and 1.25, with the same
    singular vectors: U^T O V is diagonal up to bf16's rounding."""
    torch.manual_seed(1)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, dtype=torch.float64))
    sigma = torch.logspace(0, -2, k, dtype=torch.float64)
    m = (u * sigma) @ v.T  # (rows, cols)
    o = orthogonalize(m[None].float())[0].double()  # (rows, cols)
    d = u.T @ o @ v  # (k, k): diagonal when o keeps m's singular vectors
    values = d.diagonal()
    assert values.min() > 0.6 and values.max() < 1.25, values
    assert (d - torch.diag(values)).abs().max() < 0.05


def test_orthogonalize_takes_the_zero_matrix_to_zero():
    """A parameter whose gradient is all zeros (a head that sees no data) gets no update, not
    a NaN from dividing by its zero norm."""
    zero = torch.zeros(2, 5, 3)
    assert torch.equal(orthogonalize(zero), zero.bfloat16())


@pytest.mark.parametrize("bias", [False, True])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_once_each(bias):
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16,
                            bias=bias))
    names = {id(p): n for n, p in model.named_parameters()}
    optimizers = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    taken = {part: [names[id(p)] for g in opt.param_groups for p in g["params"]]
             for part, opt in optimizers.parts.items()}
    hidden = {f"blocks.{i}.{m}.weight" for i in range(2)
              for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert set(taken["muon"]) == hidden and len(taken["muon"]) == 8
    assert sorted(taken["adamw"] + taken["muon"]) == sorted(names.values())  # each once
    assert "tok_emb.weight" in taken["adamw"]  # the embedding, and the head tied to it
    adamw_only = make_optimizer(model, TrainConfig(), torch.device("cpu")).parts
    assert list(adamw_only) == ["adamw"]
    assert sum(len(g["params"]) for g in adamw_only["adamw"].param_groups) == len(names)


def test_every_parameter_steps_with_its_own_optimizer():
    """After a step each parameter has moved, and its state is in the part that took it:
    a momentum buffer for Muon's, two moments for AdamW's."""
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16,
                            bias=True))
    optimizers = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizers.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n
    muon, adamw = optimizers.parts["muon"], optimizers.parts["adamw"]
    assert all(set(s) == {"momentum_buffer"} for s in muon.state.values())
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in adamw.state.values())
    assert len(muon.state) + len(adamw.state) == len(before)


def test_one_schedule_drives_both_optimizers_at_their_peaks():
    cfg = TrainConfig(optimizer="muon", lr=2e-3, muon_lr=0.05, min_lr=2e-4, warmup_iters=10,
                      lr_decay_iters=100)
    model = GPT(ModelConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizers = make_optimizer(model, cfg, torch.device("cpu"))
    for it in (0, 5, 10, 40, 100, 500):
        optimizers.schedule(it)
        rates = {part: {g["lr"] for g in opt.param_groups}
                 for part, opt in optimizers.parts.items()}
        assert rates["adamw"] == {lr_at(it, cfg)}
        (muon,) = rates["muon"]
        assert muon == pytest.approx(lr_at(it, cfg) * 25, rel=1e-12)
    assert muon == pytest.approx(0.005)  # ends at min_lr / lr of its peak
