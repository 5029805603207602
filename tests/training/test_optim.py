"""The optimizers: Muon held to torch.optim.Muon and to its math in float64, Polar Express's
polynomials, Newton-Schulz's precision on each kind of machine, which parameters each optimizer
takes, and one schedule driving both at their own peak rates."""

import math

import pytest
import torch
import torch.optim._muon as torch_muon

from tinygpt import optim
from tinygpt.config import ModelConfig, TrainConfig
from tinygpt.devices import cpu_bf16_units
from tinygpt.model import GPT
from tinygpt.optim import (
    SAFETY,
    Muon,
    Precision,
    lr_at,
    make_optimizer,
    newton_schulz_flops,
    newton_schulz_precision,
    orthogonalize,
    polar_express,
)

# Odd sizes, tall, wide (past 1.5x: the Gram form in fp32) and square, and shapes that repeat, so
# that a batch holds several.
SHAPES = [(45, 13), (13, 13), (13, 51), (45, 13), (7, 29), (13, 51), (45, 13), (20, 27)]
JORDAN = ((torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C),) * 5  # torch's
BF16 = Precision(torch.bfloat16, None, "asked for")
# Polar Express as published (modded-nanogpt's train_gpt.py: 5 iterations, safety factor 2e-2,
# cushion 2e-2), to which `polar_express` is held.
PUBLISHED = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
             (4.042929935166739, -2.808917465908714, 0.5000178451051316),
             (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
             (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
             (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def reference_orthogonalize(m, coefficients, scale=1.0):
    """The iterations on one float64 matrix, written out."""
    tall = m.shape[0] > m.shape[1]
    x = m.T if tall else m
    x = x / (x.norm() * scale).clamp_min(1e-7)
    for a, b, c in coefficients:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def reference_step(p, g, buf, lr, weight_decay, momentum, nesterov, coefficients, scale):
    """Muon's step on one float64 matrix, written out: momentum, Newton-Schulz, decay, step."""
    buf = momentum * buf + (1 - momentum) * g
    update = g + momentum * (buf - g) if nesterov else buf
    update = reference_orthogonalize(update, coefficients, scale)
    p = p * (1 - lr * weight_decay) - lr * math.sqrt(max(1, p.shape[0] / p.shape[1])) * update
    return p, buf


def distances(make, coefficients, scale, nesterov=True):
    """Four Muon steps of the optimizer `make(params, **settings)` on fresh gradients at every
    shape: each parameter's distance from the float64 math (`coefficients`, the momentum over
    its norm times `scale`), and the optimizer."""
    torch.manual_seed(0)
    params = [torch.randn(s) for s in SHAPES]
    exact = [p.double() for p in params]
    bufs = [torch.zeros_like(p) for p in exact]
    settings = dict(lr=0.03, weight_decay=0.2, momentum=0.9, nesterov=nesterov)
    opt = make(params, **settings)
    for _ in range(4):
        grads = [torch.randn(s) * 10 ** torch.empty(()).uniform_(-3, 1) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            exact[i], bufs[i] = reference_step(exact[i], g.double(), bufs[i], **settings,
                                               coefficients=coefficients, scale=scale)
    return [(p.double() - e).abs().max().item() for p, e in zip(params, exact)], opt


def torch_distances(nesterov=True):
    """torch.optim.Muon's distances from its own math (no margin on the norm)."""
    return distances(torch.optim.Muon, JORDAN, 1.0, nesterov)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_is_torch_muon_batched(nesterov):
    """With torch's coefficients and in bf16 as torch's: each parameter at most 2x as far from
    the float64 math as torch.optim.Muon's is from its own, and the same momentum."""
    torch_errors, torch_opt = torch_distances(nesterov)
    errors, opt = distances(lambda p, **s: Muon(p, **s, coefficients=JORDAN, precision=BF16),
                            JORDAN, 1 + SAFETY, nesterov)
    for shape, error, torch_error in zip(SHAPES, errors, torch_errors):
        assert error <= 2 * torch_error + 1e-7, (shape, error, torch_error)
        assert torch_error < 0.1 * 0.03  # bf16's error, a tenth of the learning rate
    for ours, theirs in zip(opt.param_groups[0]["params"], torch_opt.param_groups[0]["params"]):
        torch.testing.assert_close(opt.state[ours]["momentum_buffer"],
                                   torch_opt.state[theirs]["momentum_buffer"])


def test_muon_in_fp32_is_ten_times_closer_than_bf16():
    """The default, Polar Express in fp32 (the Gram form for the shapes past 1.5x wide): each
    parameter at most a tenth as far from its float64 math as torch's bf16 Muon from its own."""
    torch_errors, _ = torch_distances()
    coefficients = polar_express(5)
    errors, _ = distances(Muon, coefficients, 1 + SAFETY)
    for shape, error, torch_error in zip(SHAPES, errors, torch_errors):
        assert error <= 0.1 * torch_error, (shape, error, torch_error)


def test_polar_express_is_the_published_one():
    """The paper's greedy construction, as modded-nanogpt computed it."""
    for ours, published in zip(polar_express(5), PUBLISHED, strict=True):
        assert ours == pytest.approx(published, rel=1e-12, abs=1e-12)


def composite(coefficients, x):
    """The polynomials applied one after another to the numbers x."""
    for a, b, c in coefficients:
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("steps", [3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 16), (16, 16), (9, 40), (20, 27)])
def test_orthogonalize_keeps_singular_vectors_and_maps_each_value(shape, dtype, steps):
    """Singular values spread over two decades come out as the polynomials map them, with the
    same singular vectors: O = U p(Sigma) V^T, up to the dtype's rounding: bf16's 8 bits through
    steep polynomials; in fp32, (64, 16) and (9, 40) take the Gram form, whose squared singular
    values cost it about 5 of fp32's bits (1e-6 for the direct form), still 100x bf16's."""
    torch.manual_seed(1)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, dtype=torch.float64))
    sigma = torch.logspace(0, -2, k, dtype=torch.float64)
    m = (u * sigma) @ v.T  # (rows, cols)
    coefficients = polar_express(steps)
    o = orthogonalize(m[None].float(), coefficients, dtype)[0].double()  # (rows, cols)
    exact = (u * composite(coefficients, sigma / (sigma.norm() * (1 + SAFETY)))) @ v.T
    error = ((o - exact).norm() / exact.norm()).item()
    assert error < (0.05 if dtype == torch.bfloat16 else 1e-4), error


@pytest.mark.parametrize("shape", [(3, 13, 51), (2, 64, 16), (1, 7, 29)])
def test_the_gram_form_is_the_same_math(shape, monkeypatch):
    """In float64, iterating on the Gram matrix gives what the direct iterations give."""
    torch.manual_seed(2)
    m = torch.randn(shape, dtype=torch.float64)
    gram = orthogonalize(m, polar_express(4), torch.float64)
    monkeypatch.setattr(optim, "GRAM_ASPECT", math.inf)  # the direct form for every shape
    direct = orthogonalize(m, polar_express(4), torch.float64)
    assert (gram - direct).abs().max() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalize_takes_the_zero_matrix_to_zero(dtype):
    """A parameter whose gradient is all zeros (a head that sees no data) gets no update, not
    a NaN from dividing by its zero norm, in either form."""
    for shape in ((2, 5, 3), (2, 3, 9)):
        zero = torch.zeros(shape)
        assert torch.equal(orthogonalize(zero, polar_express(5), dtype), zero.to(dtype))


def test_polar_express_takes_its_range_towards_one():
    """Every polynomial after the first is the best for what the ones before leave: the worst
    value in [LOWEST, 1] comes nearer to 1 at each iteration, and within 0.2 of it after five."""
    x = torch.logspace(-3, 0, 10_001, dtype=torch.float64) / (1 + SAFETY)
    worst = [(composite(polar_express(k), x) - 1).abs().max().item() for k in range(1, 8)]
    assert all(a > b for a, b in zip(worst, worst[1:])), worst
    assert worst[4] < 0.2 and worst[6] < 0.01, worst


@pytest.mark.parametrize("steps", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_flops_counts_the_products(steps, dtype):
    """The FLOPs the start line reports are those torch counts in `orthogonalize`, whichever
    form each shape takes."""
    from torch.utils.flop_counter import FlopCounterMode

    shapes = [(384, 128), (128, 128), (128, 512), (45, 13), (20, 27)]
    counted = 0
    for shape in shapes:
        with FlopCounterMode(display=False) as counter:
            orthogonalize(torch.randn(1, *shape), polar_express(steps), dtype)
        counted += counter.get_total_flops()
    assert newton_schulz_flops([torch.Size(s) for s in shapes], steps, dtype) == counted


@pytest.mark.parametrize("flags, environ, units", [
    ({"amx": True, "avx512_bf16": True}, {}, "AMX"),
    ({"amx": False, "avx512_bf16": True}, {}, "AVX-512 BF16"),
    ({"amx": False, "avx512_bf16": False}, {}, None),
    ({"amx": True, "avx512_bf16": True}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, None),
    ({"amx": True, "avx512_bf16": True}, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, None),
    ({"amx": True, "avx512_bf16": True}, {"DNNL_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, None),
    ({"amx": True, "avx512_bf16": True}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "AMX"),
    ({"amx": True, "avx512_bf16": True}, {"ONEDNN_MAX_CPU_ISA": "ALL"}, "AMX"),
])
def test_bf16_units_as_onednn_may_use_them(flags, environ, units):
    found, why = cpu_bf16_units(environ, flags)
    assert found == units
    assert (why == "") == (units is not None)
    if environ and units is None:
        assert why.startswith(f"{next(iter(environ))}=") and "keeps oneDNN off" in why


def test_newton_schulz_runs_in_fp32_on_a_cpu_without_bf16_units(monkeypatch):
    """The same simulated AMX machine: bf16 on one thread, and fp32 at the run's thread count
    once ONEDNN_MAX_CPU_ISA=AVX2 makes it a CPU without bf16 units; a GPU from sm_80 and MPS."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    cpu = torch.device("cpu")
    assert newton_schulz_precision(cpu, {}) == Precision(
        torch.bfloat16, 1, "AMX; one thread for the same results at any count")
    slow = newton_schulz_precision(cpu, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert (slow.dtype, slow.threads) == (torch.float32, None)
    assert slow.words == "fp32, ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN off this CPU's AMX"
    assert newton_schulz_precision(torch.device("mps"), {}).dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert newton_schulz_precision(torch.device("cuda"), {}).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    assert newton_schulz_precision(torch.device("cuda"), {}).dtype == torch.float32


def test_pinned_products_run_on_one_thread(monkeypatch):
    """Muon keeps bf16 products on the CPU to their one thread, and gives the run its count
    back after them."""
    seen = []
    real = optim.orthogonalize
    monkeypatch.setattr(optim, "orthogonalize",
                        lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    params = [torch.randn(s) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    found = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Muon(params, precision=Precision(torch.bfloat16, 1, "pinned")).step()
        assert seen == [1] * len(set(SHAPES)) and torch.get_num_threads() == 2
        seen.clear()
        Muon(params).step()
        assert seen == [2] * len(set(SHAPES))
    finally:
        torch.set_num_threads(found)


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
