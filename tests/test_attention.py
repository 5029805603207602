"""The Triton attention against the float64 reference, with PyTorch's own error as the yardstick.

Runs on CUDA when present, otherwise in Triton's interpreter on the CPU (see conftest.py); bf16
only on CUDA (the interpreter's bf16 tl.dot is wrong). Rule: max |kernel - fp64 reference| is at
most 2x (output) or 3x (gradients) the error of F.scaled_dot_product_attention in the same dtype,
plus a small atol.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from tinygpt.kernels import attention, attention_dropout_mask
from tinygpt.kernels.reference import attention_reference

attention_module = importlib.import_module("tinygpt.kernels.attention")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernels skip cannot pass."""
    monkeypatch.setattr(attention_module, "_new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                device=device))


def _qkv(B, H, T, S, D, dtype, strided=False):
    if strided:  # views into one (B, T, 3, H, D) projection, as the model produces them
        assert T == S
        qkv = torch.randn(B, T, 3, H, D, device=DEVICE, dtype=dtype)
        return list(qkv.permute(2, 0, 3, 1, 4).unbind(0))
    return [torch.randn(B, H, n, D, device=DEVICE, dtype=dtype) for n in (T, S, S)]


def _run(fn, q, k, v, do):
    """Output and (dq, dk, dv) of fn(q, k, v) for the upstream gradient do."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _assert_within_rule(ours, torch_lp, exact, dtype):
    factors = (2, 3, 3, 3)  # output, then gradients
    for name, o, t, e, factor in zip(("out", "dq", "dk", "dv"), ours, torch_lp, exact, factors):
        assert o.shape == e.shape and o.dtype == t.dtype, name
        assert torch.isfinite(o).all(), f"{name}: unwritten (NaN) or non-finite elements"
        err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        assert err <= factor * torch_err + ATOL[dtype], f"{name}: {err:.3g} vs {torch_err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 17, 64, 97, 128, 200])
def test_matches_reference(T, D, causal, dtype):
    B, H = 2, 3
    q, k, v = _qkv(B, H, T, T, D, dtype)
    do = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)
    ours = _run(lambda q, k, v: attention(q, k, v, causal=causal), q, k, v, do)
    torch_lp = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                    q, k, v, do)
    exact = _run(lambda q, k, v: attention_reference(q, k, v, causal=causal, upcast=torch.float64),
                 q, k, v, do)
    _assert_within_rule(ours, torch_lp, exact, dtype)


@pytest.mark.parametrize(
    "B,H,T,S,D,causal,strided",
    [(1, 2, 130, 70, 32, True, False), (1, 2, 70, 130, 32, True, False),
     (2, 1, 70, 130, 16, False, False), (2, 6, 93, 93, 64, True, True),
     (1, 2, 150, 150, 128, True, False), (1, 1, 33, 33, 128, False, True)],
)
def test_shapes_strides_and_head_dim_128(B, H, T, S, D, causal, strided):
    dtype = torch.float16
    q, k, v = _qkv(B, H, T, S, D, dtype, strided=strided)
    do = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)
    ours = _run(lambda q, k, v: attention(q, k, v, causal=causal, scale=0.3), q, k, v, do)
    exact = _run(lambda q, k, v: attention_reference(q, k, v, causal=causal, scale=0.3,
                                                     upcast=torch.float64), q, k, v, do)
    def torch_fn(q, k, v):
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
        # SDPA aligns a causal mask differently when T != S: the reference math in fp16 instead
        return attention_reference(q, k, v, causal=causal, scale=0.3)

    _assert_within_rule(ours, _run(torch_fn, q, k, v, do), exact, dtype)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_the_right_fraction(p):
    mask = attention_dropout_mask(4, 4, 256, 256, p, seed=torch.randint(0, 2**40, ()).item(),
                                  device=DEVICE)
    assert mask.dtype == torch.bool and mask.shape == (4, 4, 256, 256)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    # no structure across heads or rows: different heads and rows get different masks
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0, 0], mask[0, 0, 1])


def test_dropout_mask_depends_on_position_not_shape():
    """Each weight's draw is keyed by (row, column, batch-head), not a flat index that could
    overflow: a small mask is the corner of a larger one."""
    small = attention_dropout_mask(2, 3, 40, 50, 0.3, seed=9, device=DEVICE)
    large = attention_dropout_mask(2, 3, 300, 70, 0.3, seed=9, device=DEVICE)
    assert torch.equal(small, large[:, :, :40, :50])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [17, 97, 200])
def test_dropout_matches_reference_with_its_mask(T, causal):
    B, H, D, p = 2, 2, 32, 0.2
    dtype = torch.float32
    seed = torch.randint(0, 2**40, ()).item()
    q, k, v = _qkv(B, H, T, T, D, dtype)
    do = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)
    mask = attention_dropout_mask(B, H, T, T, p, seed, device=DEVICE)
    ours = _run(lambda q, k, v: attention(q, k, v, causal=causal, dropout_p=p, seed=seed),
                q, k, v, do)
    ref_lp = _run(lambda q, k, v: attention_reference(q, k, v, causal=causal, dropout_p=p,
                                                      dropout_mask=mask), q, k, v, do)
    exact = _run(lambda q, k, v: attention_reference(q, k, v, causal=causal, dropout_p=p,
                                                     dropout_mask=mask, upcast=torch.float64),
                 q, k, v, do)
    _assert_within_rule(ours, ref_lp, exact, dtype)


def test_dropout_seeds():
    q, k, v = _qkv(1, 2, 64, 64, 16, torch.float32)
    a = attention(q, k, v, dropout_p=0.5, seed=1)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=1))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=2))
    torch.manual_seed(3)
    b = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(b, attention(q, k, v, dropout_p=0.5))
    assert not torch.equal(b, attention(q, k, v, dropout_p=0.5))  # the generator moved on
    assert torch.equal(attention(q, k, v, dropout_p=0.0), attention(q, k, v))


@pytest.mark.parametrize(
    "shapes,kwargs,error,match",
    [
        (((1, 1, 8, 24),) * 3, {}, ValueError, "head dim 24"),
        (((1, 1, 8, 16), (1, 1, 8, 16), (1, 1, 9, 16)), {}, ValueError, "same shape"),
        (((1, 2, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16)), {}, ValueError, "must match q"),
        (((8, 16), (8, 16), (8, 16)), {}, ValueError, r"\(B, H, T, D\)"),
        (((1, 1, 8, 16),) * 3, {"dropout_p": 1.0}, ValueError, "dropout_p"),
        (((1, 1, 0, 16),) * 3, {}, ValueError, "non-empty"),
    ],
)
def test_misuse_is_named(shapes, kwargs, error, match):
    q, k, v = (torch.randn(s, device=DEVICE) for s in shapes)
    with pytest.raises(error, match=match):
        attention(q, k, v, **kwargs)


def test_mixed_dtypes_and_devices_are_named():
    q = torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(TypeError, match="k is torch.float16 but q is torch.float32"):
        attention(q, q.half(), q)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        attention(q.double(), q.double(), q.double())


def test_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention(q, q, q)


def test_registered_op_passes_opcheck():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 37, 37, 16, torch.float32))
    seed = torch.tensor([5], device=DEVICE)
    # The interpreter reads real memory, so AOT tracing through the kernels needs CUDA.
    kwargs = {} if CUDA else {"test_utils": ("test_schema", "test_autograd_registration",
                                             "test_faketensor")}
    torch.library.opcheck(torch.ops.tinygpt.attention_fwd.default,
                          (q, k, v, True, 0.0, seed, 0.25), **kwargs)


def test_torch_compile_traces_without_graph_break():
    q, k, v = _qkv(1, 2, 37, 37, 16, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, dropout_p=0.1, seed=4),
                             backend="inductor" if CUDA else "eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v, dropout_p=0.1, seed=4),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not CUDA, reason="peak memory is measured on CUDA")
def test_peak_memory_is_linear_in_sequence_length():
    def peak(T):
        q, k, v = (t.requires_grad_() for t in _qkv(1, 4, T, T, 64, torch.bfloat16))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        attention(q, k, v).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    small, large = peak(4096), peak(16384)
    assert large < 4 * small * 1.25  # 4x the tokens: linear growth, far below the 16x of T^2
