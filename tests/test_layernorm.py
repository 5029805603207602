"""The Triton LayerNorm against the float64 reference, with PyTorch's own error as the yardstick.

Runs on CUDA when present, otherwise in Triton's interpreter on the CPU (see conftest.py).
Rule: max |kernel - fp64 reference| <= 2 * max |F.layer_norm in the same dtype - fp64 reference|
+ atol, for y, dx, dw and db.
"""

import pytest
import torch
import torch.nn.functional as F
from tinygpt.kernels import layernorm
from tinygpt.kernels.layernorm import MAX_N, layer_norm
from tinygpt.kernels.reference import layer_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
AFFINE = {"weight+bias": (True, True), "weight": (True, False), "bias": (False, True),
          "none": (False, False)}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernel skips cannot pass."""
    monkeypatch.setattr(layernorm, "_new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                device=device))


def _inputs(shape, dtype, affine):
    has_w, has_b = AFFINE[affine]
    N = shape[-1]
    x = torch.randn(shape, device=DEVICE) * 2.0 + 0.5
    w = torch.randn(N, device=DEVICE) if has_w else None
    b = torch.randn(N, device=DEVICE) if has_b else None
    dy = torch.randn(shape, device=DEVICE)
    return [t if t is None else t.to(dtype) for t in (x, w, b, dy)]


def _run(fn, x, w, b, dy):
    """Output and gradients (dx, dw, db; None where there is no such input) of fn(x, w, b)."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


def _check_against_reference(shape, dtype, affine):
    x, w, b, dy = _inputs(shape, dtype, affine)
    N = shape[-1]
    ours = _run(lambda x, w, b: layer_norm(x, w, b), x, w, b, dy)
    torch_lp = _run(lambda x, w, b: F.layer_norm(x, (N,), w, b), x, w, b, dy)
    exact = _run(lambda x, w, b: layer_norm_reference(x, w, b, upcast=torch.float64), x, w, b, dy)
    for name, o, t, e in zip(("y", "dx", "dw", "db"), ours, torch_lp, exact):
        if e is None:
            assert o is None, name
            continue
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert torch.isfinite(o).all(), f"{name}: unwritten (NaN) or non-finite elements"
        err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        atol = ATOL[dtype] * max(1.0, e.abs().max().item())
        assert err <= 2 * torch_err + atol, f"{name}: error {err:.3g} vs torch {torch_err:.3g}"


@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 129), (2, 5, 384), (4, 1, 2), (6, 1531)])
def test_small_shapes(shape, dtype, affine):
    _check_against_reference(shape, dtype, affine)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1151, 1000), (1151, 4096)])
def test_many_rows(shape, dtype):
    _check_against_reference(shape, dtype, "weight+bias")


@pytest.mark.parametrize("shape", [(1, MAX_N), (3, 40_000)])
def test_widest_rows(shape):
    _check_against_reference(shape, torch.float32, "weight+bias")


def test_non_contiguous_inputs():
    base = torch.randn(40, 2 * 129, device=DEVICE)
    w, b = torch.randn(129, device=DEVICE), torch.randn(129, device=DEVICE)
    for x in (base[:, ::2], base.t()[:129].t(), base.view(40, 2, 129).transpose(0, 1)):
        assert not x.is_contiguous()
        expected = layer_norm_reference(x, w, b, upcast=torch.float64)
        torch.testing.assert_close(layer_norm(x, w, b).double(), expected, atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic():
    x, w, b, dy = _inputs((513, 257), torch.float32, "weight+bias")
    first = _run(layer_norm, x, w, b, dy)
    second = _run(layer_norm, x, w, b, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_eps_is_used():
    x = torch.tensor([[1.0, -1.0]], device=DEVICE)
    torch.testing.assert_close(layer_norm(x, eps=3.0), x / 2.0)  # var 1, rstd 1/sqrt(1+3)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (torch.randn(2, MAX_N + 1), None, None), ValueError, "last dimension"),
        (lambda: (torch.randn(2, 0), None, None), ValueError, "last dimension"),
        (lambda: (torch.randn(3, 8), torch.randn(7), None), ValueError, "weight must have shape"),
        (lambda: (torch.randn(3, 8), None, torch.randn(8, 1)), ValueError, "bias must have shape"),
        (lambda: (torch.randint(0, 5, (3, 8)), None, None), TypeError, "x must be float16"),
        (lambda: (torch.randn(3, 8, dtype=torch.float64), None, None), TypeError, "x must be"),
        (lambda: (torch.randn(3, 8), torch.ones(8, dtype=torch.int32), None), TypeError,
         "weight must be a floating-point"),
    ],
)
def test_misuse_is_named(make, error, match):
    x, w, b = (t if t is None else t.to(DEVICE) for t in make())
    with pytest.raises(error, match=match):
        layer_norm(x, w, b)


def test_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        layer_norm(torch.randn(2, 8))


def test_registered_op_passes_opcheck():
    x, w, b, _ = _inputs((5, 33), torch.float32, "weight+bias")
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5)
    # The interpreter reads real memory, so AOT tracing through the kernel needs CUDA.
    utils = None if DEVICE == "cuda" else ("test_schema", "test_autograd_registration",
                                           "test_faketensor")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.tinygpt.layer_norm_fwd.default, args, **kwargs)


def test_torch_compile_traces_without_graph_break():
    x, w, b, _ = _inputs((5, 33), torch.float32, "weight+bias")
    backend = "inductor" if DEVICE == "cuda" else "eager"  # dynamo only, on the CPU
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: layer_norm(x, w, b), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer_norm_reference(x, w, b), atol=1e-5, rtol=1e-5)
