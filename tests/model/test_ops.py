"""The two pure-PyTorch backends agree, forward and backward, and dispatch picks the right one."""

import re

import pytest
import torch
import torch.nn.functional as F
from tinygpt.kernels.reference import attention_reference, layer_norm_reference

from tinygpt import ops
from tinygpt.errors import UserError


def _grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> with respect to each input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 8), (2, 3, 17, 16), (3, 2, 97, 32)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_reference_matches_sdpa(B, H, T, D, causal):
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))

    def ref(q, k, v):
        return attention_reference(q, k, v, causal=causal)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    grad_out = torch.randn_like(q)
    out_r, grads_r = _grads(ref, (q, k, v), grad_out)
    out_t, grads_t = _grads(sdpa, (q, k, v), grad_out)
    torch.testing.assert_close(out_r, out_t)
    for g_r, g_t in zip(grads_r, grads_t):
        torch.testing.assert_close(g_r, g_t)


def test_attention_reference_is_causal():
    q, k, v = (torch.randn(1, 1, 9, 8) for _ in range(3))
    out = attention_reference(q, k, v)
    v_future = v.clone()
    v_future[..., 5:, :] += 100.0  # changing the future must not change the past
    out_future = attention_reference(q, k, v_future)
    torch.testing.assert_close(out[..., :5, :], out_future[..., :5, :])
    assert not torch.allclose(out[..., 5:, :], out_future[..., 5:, :])


def test_attention_reference_dropout_mask():
    q, k, v = (torch.randn(2, 2, 13, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 2, 13, 13) > 0.3
    out = attention_reference(q, k, v, dropout_p=0.3, dropout_mask=mask)
    scores = (q @ k.transpose(-2, -1) / 8**0.5).masked_fill(
        ~torch.ones(13, 13, dtype=torch.bool).tril(), float("-inf"))
    expected = (scores.softmax(-1) * mask / 0.7) @ v
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 129), (2, 5, 384)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_reference_matches_torch(shape, affine):
    N = shape[-1]
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    w = torch.randn(N, dtype=torch.float64) if affine != "none" else None
    b = torch.randn(N, dtype=torch.float64) if affine == "both" else None
    inputs = [t for t in (x, w, b) if t is not None]

    def split(*ts):
        it = iter(ts)
        x_ = next(it)
        return x_, (next(it) if w is not None else None), (next(it) if b is not None else None)

    grad_out = torch.randn_like(x)
    out_r, g_r = _grads(lambda *ts: layer_norm_reference(*split(*ts), eps=1e-5), inputs, grad_out)
    out_t, g_t = _grads(lambda *ts: F.layer_norm(ts[0], (N,), *split(*ts)[1:], eps=1e-5), inputs,
                        grad_out)
    torch.testing.assert_close(out_r, out_t)
    for a, b_ in zip(g_r, g_t):
        torch.testing.assert_close(a, b_)


def test_reference_upcast_returns_wider_dtype():
    x = torch.randn(4, 33, dtype=torch.float16)
    y = layer_norm_reference(x, None, None, upcast=torch.float64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.mean(-1), torch.zeros(4, dtype=torch.float64), atol=1e-7, rtol=0)


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("TINYGPT_BACKEND", raising=False)
    assert ops.resolve_backend("auto", "cpu") == "torch"
    assert ops.resolve_backend("reference", "cpu") == "reference"
    monkeypatch.setenv("TINYGPT_BACKEND", "reference")
    assert ops.resolve_backend("auto", "cpu") == "reference"
    assert ops.resolve_backend("torch", "cpu") == "torch"  # an explicit choice wins
    with pytest.raises(UserError, match="unknown backend"):
        ops.resolve_backend("fast", "cpu")


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="needs a CUDA device"):
        ops.resolve_backend("triton", "cpu")


def test_gpus_before_ampere_use_the_torch_backend(monkeypatch):
    """A Turing GPU (sm_75) has too little shared memory for the kernels' tiles and only
    emulates bf16: `auto` picks torch and says why, `triton` is refused, autocast is fp16."""
    from tinygpt.kernels import gpu
    monkeypatch.delenv("TINYGPT_BACKEND", raising=False)
    monkeypatch.setattr(gpu, "_cuda_target", lambda index: gpu.Target(75, 65536))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    ops._warn_once.cache_clear()
    with pytest.warns(UserWarning, match=r"Tesla T4\) has compute capability 7\.5.*torch backend"):
        assert ops.resolve_backend("auto", "cuda:0") == "torch"
    with pytest.raises(UserError, match="compute capability 7.5.*--backend torch"):
        ops.resolve_backend("triton", "cuda:0")
    assert ops.precision(torch.device("cuda:0")) == (torch.float16, "fp16 autocast + GradScaler")

    monkeypatch.setattr(gpu, "_cuda_target", lambda index: gpu.Target(86, 101376))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert ops.resolve_backend("auto", "cuda:0") == "triton"
    assert ops.resolve_backend("triton", "cuda:0") == "triton"
    # A model whose attention the kernels cannot take: auto runs it on torch, triton refuses it.
    for shape in (ops.AttentionShape(8, 6, 48), ops.AttentionShape(64, 8, 256)):
        assert ops.resolve_backend("auto", "cuda:0", shape) == "triton"
    for shape, why in ((ops.AttentionShape(8, 2, 300), "head dim 300 is not supported"),
                       (ops.AttentionShape(40000, 2, 64), "batch x heads = 40000 x 2")):
        with pytest.warns(UserWarning, match=f"{re.escape(why)}.*using the torch backend"):
            assert ops.resolve_backend("auto", "cuda:0", shape) == "torch"
        with pytest.raises(UserError, match=f"{re.escape(why)}.*--backend torch"):
            ops.resolve_backend("triton", "cuda:0", shape)
    assert ops.precision(torch.device("cuda:0"))[0] == torch.bfloat16
    assert ops.precision(torch.device("cpu")) == (None, "fp32")
