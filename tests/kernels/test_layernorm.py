"""The Triton LayerNorm and add+LayerNorm against the float64 reference, with PyTorch's own error
as the yardstick.

Runs on CUDA when present, otherwise in Triton's interpreter on the CPU (see conftest.py).
Rule: max |kernel - fp64 reference| <= 2 * max |PyTorch in the same dtypes - fp64 reference|
+ atol, for every output and every gradient.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
import triton
from tinygpt.kernels import layernorm
from tinygpt.kernels.layernorm import ROW_IN_REGISTERS, add_layer_norm, layer_norm
from tinygpt.kernels.reference import layer_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
AFFINE = {"weight+bias": (True, True), "weight": (True, False), "bias": (False, True),
          "none": (False, False)}
WIDE = ROW_IN_REGISTERS + 809  # column tiles, the last one partial
# More rows than the backward pass has programs along them (4 per SM on CUDA, 8 in the
# interpreter), so each program sums the dw, db partials of several rows; fewer in the interpreter,
# where every row costs time.
MANY_ROWS = 1151 if DEVICE == "cuda" else 67


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernel skips cannot pass."""
    monkeypatch.setattr(layernorm, "_new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                device=device))


def _params(N, dtype, affine):
    has_w, has_b = AFFINE[affine]
    w = torch.randn(N, device=DEVICE).to(dtype) if has_w else None
    b = torch.randn(N, device=DEVICE).to(dtype) if has_b else None
    return w, b


def _inputs(shape, dtype, affine):
    x = (torch.randn(shape, device=DEVICE) * 2.0 + 0.5).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    return (x, *_params(shape[-1], dtype, affine), dy)


def _run(fn, inputs, grads_out):
    """Outputs of fn(*inputs) and the gradient of each input (None where an input is None),
    after backpropagating grads_out through the outputs."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads_out)])
    return [o.detach() for o in outs] + [None if t is None else t.grad for t in leaves]


def _assert_close_to_exact(names, ours, torch_lp, exact, atol):
    for name, o, t, e in zip(names, ours, torch_lp, exact):
        if e is None:
            assert o is None, name
            continue
        assert o.dtype == t.dtype and o.shape == t.shape, f"{name}: {o.dtype} vs {t.dtype}"
        assert torch.isfinite(o).all(), f"{name}: unwritten (NaN) or non-finite elements"
        err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        tol = ATOL[atol[name]] * max(1.0, e.abs().max().item())
        assert err <= 2 * torch_err + tol, f"{name}: error {err:.3g} vs torch {torch_err:.3g}"


def _check_against_reference(shape, dtype, affine):
    x, w, b, dy = _inputs(shape, dtype, affine)
    N = shape[-1]
    args = [(x, w, b), [dy]]
    ours = _run(lambda x, w, b: layer_norm(x, w, b), *args)
    torch_lp = _run(lambda x, w, b: F.layer_norm(x, (N,), w, b), *args)
    exact = _run(lambda x, w, b: layer_norm_reference(x, w, b, upcast=torch.float64), *args)
    names = ("y", "dx", "dw", "db")
    _assert_close_to_exact(names, ours, torch_lp, exact, dict.fromkeys(names, dtype))


@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 129), (2, 5, 384), (4, 1, 2), (6, 1531)])
def test_small_shapes(shape, dtype, affine):
    _check_against_reference(shape, dtype, affine)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [1000, ROW_IN_REGISTERS])
def test_many_rows(N, dtype):
    _check_against_reference((MANY_ROWS, N), dtype, "weight+bias")


@pytest.mark.parametrize("shape", [(3, WIDE), (2, 40_000), (1, 100_003)])
def test_rows_wider_than_the_registers(shape):
    _check_against_reference(shape, torch.float32, "weight+bias")


def test_tiled_statistics_are_stable_far_from_zero():
    """A large common offset must not swamp the variance (no E[x^2] - E[x]^2 cancellation)."""
    x = torch.randn(2, WIDE, device=DEVICE) + 1000.0
    expected = layer_norm_reference(x, None, None, upcast=torch.float64)
    assert (layer_norm(x).double() - expected).abs().max().item() < 2e-3


# Input pairs (x, residual) the model meets: fp32 without autocast; under autocast the branch
# output is bf16 or fp16 and the residual stream fp32; and all-16-bit streams.
PAIRS = {"fp32+fp32": (torch.float32, torch.float32), "bf16+fp32": (torch.bfloat16, torch.float32),
         "fp16+fp32": (torch.float16, torch.float32), "fp16+fp16": (torch.float16, torch.float16)}
OUT = {"same": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _check_add_against_reference(shape, pair, out, affine):
    x_dtype, r_dtype = PAIRS[pair]
    out_dtype = OUT[out]
    h_dtype = torch.promote_types(x_dtype, r_dtype)
    N = shape[-1]
    x = (torch.randn(shape, device=DEVICE) * 2.0 + 0.5).to(x_dtype)
    r = (torch.randn(shape, device=DEVICE) * 3.0 - 1.0).to(r_dtype)
    w, b = _params(N, h_dtype, affine)
    dy = torch.randn(shape, device=DEVICE).to(out_dtype or h_dtype)
    dh = torch.randn(shape, device=DEVICE).to(h_dtype)  # from the residual stream's later uses

    def unfused(x, r, w, b, ln):
        h = x + r
        return ln(h, w, b).to(out_dtype or h.dtype), h

    args = [(x, r, w, b), [dy, dh]]
    ours = _run(lambda x, r, w, b: add_layer_norm(x, r, w, b, out_dtype=out_dtype), *args)
    torch_lp = _run(lambda *t: unfused(*t, lambda h, w, b: F.layer_norm(h, (N,), w, b)), *args)
    exact = _run(lambda x, r, w, b: unfused(
        *(t if t is None else t.double() for t in (x, r, w, b)), layer_norm_reference), *args)
    exact = [e.double() if e is not None else None for e in exact]
    names = ("y", "h", "dx", "dresidual", "dw", "db")
    atol = dict(y=out_dtype or h_dtype, h=h_dtype, dx=x_dtype, dresidual=r_dtype, dw=h_dtype,
                db=h_dtype)
    _assert_close_to_exact(names, ours, torch_lp, exact, atol)


@pytest.mark.parametrize("out", list(OUT))
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 129), (2, 5, 384), (2, WIDE)])
def test_add_layer_norm(shape, pair, out):
    _check_add_against_reference(shape, pair, out, "weight+bias")


@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
def test_add_layer_norm_without_weight_or_bias(affine):
    _check_add_against_reference((4, 3, 384), "bf16+fp32", "bf16", affine)


def test_add_layer_norm_with_the_new_residual_unused():
    """Only y feeds the loss (the final LayerNorm): the gradient into h is then absent."""
    x, r = torch.randn(5, 33, device=DEVICE), torch.randn(5, 33, device=DEVICE)
    x.requires_grad_()
    y, _ = add_layer_norm(x, r)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    x_ref = x.detach().double().requires_grad_()
    y_ref = layer_norm_reference(x_ref + r.double(), None, None)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs():
    base = torch.randn(40, 2 * 129, device=DEVICE)
    w, b = torch.randn(129, device=DEVICE), torch.randn(129, device=DEVICE)
    for x in (base[:, ::2], base.t()[:129].t(), base.view(40, 2, 129).transpose(0, 1)):
        assert not x.is_contiguous()
        expected = layer_norm_reference(x, w, b, upcast=torch.float64)
        torch.testing.assert_close(layer_norm(x, w, b).double(), expected, atol=1e-5, rtol=1e-5)
        r = torch.randn(x.shape, device=DEVICE).mT.contiguous().mT  # columns contiguous
        y, h = add_layer_norm(x, r, w, b)
        torch.testing.assert_close(h, x + r)
        expected = layer_norm_reference(x + r, w, b, upcast=torch.float64)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N", [257, WIDE])
def test_backward_is_deterministic(N):
    x, w, b, dy = _inputs((MANY_ROWS, N), torch.float32, "weight+bias")
    r = torch.randn_like(x)
    first = _run(add_layer_norm, (x, r, w, b), [dy, dy])
    second = _run(add_layer_norm, (x, r, w, b), [dy, dy])
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("N", [2, WIDE + 1], ids=["in registers", "column tiles"])
@pytest.mark.parametrize("norm", [layer_norm, layer_norm_reference])
def test_eps_is_used(norm, N):
    """A row of +1 and -1 (mean 0, variance 1) with eps 3 is halved; a constant row (variance
    0) under the default eps comes out as the bias, not NaN."""
    x = torch.ones(2, N, device=DEVICE)
    x[0, 1::2] = -1.0
    torch.testing.assert_close(norm(x[:1], None, None, eps=3.0), x[:1] / 2.0)  # rstd 1/sqrt(1+3)
    w, b = torch.randn(2, N, device=DEVICE)
    torch.testing.assert_close(norm(x[1:], w, b), b[None, :])


def test_weight_and_bias_gradients_summed_over_many_programs(monkeypatch):
    """The backward spreads rows over up to 4 programs per SM (528 on an H100), whose dw, db
    partials a second launch sums 16 at a time: here one program per 2 rows, 34 in all."""
    monkeypatch.setattr(layernorm, "_row_groups",
                        lambda M, block_m, tiles, device: triton.cdiv(M, block_m))
    _check_against_reference((MANY_ROWS, 1531), torch.float32, "weight+bias")


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (torch.randn(2, 0), None, None), ValueError, "x is empty"),
        (lambda: (torch.randn(0, 8), None, None), ValueError, "x is empty"),
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


@pytest.mark.parametrize(
    "residual,kwargs,error,match",
    [
        (torch.randn(3, 9), {}, ValueError, "residual has shape"),
        (torch.randn(3, 8, dtype=torch.float64), {}, TypeError, "residual must be a float16"),
        (torch.randn(3, 8), {"out_dtype": torch.int8}, TypeError, "out_dtype must be"),
    ],
)
def test_add_misuse_is_named(residual, kwargs, error, match):
    with pytest.raises(error, match=match):
        add_layer_norm(torch.randn(3, 8, device=DEVICE), residual.to(DEVICE), **kwargs)


def test_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        layer_norm(torch.randn(2, 8))


def test_launches_pass_wrap_triton_compiled_kernels_only(monkeypatch):
    """torch before 2.13 refuses the interpreter's kernels in wrap_triton, as this stand-in does:
    the launches still run (the interpreter's kernels skip it), forward and backward."""
    from tinygpt.kernels import gpu
    from triton.runtime.jit import JITFunction

    def strict_wrap_triton(kernel):
        if not isinstance(kernel, JITFunction):
            raise RuntimeError("wrap_triton only works on functions annotated with triton.jit")
        return kernel

    monkeypatch.setattr(gpu, "wrap_triton", strict_wrap_triton)
    inputs = _inputs((3, 40), torch.float32, "weight+bias")
    ours = _run(layer_norm, inputs[:3], inputs[3:])
    exact = _run(layer_norm_reference, [t.double() for t in inputs[:3]], inputs[3:])
    for name, o, e in zip(("y", "dx", "dw", "db"), ours, exact):
        torch.testing.assert_close(o, e.float(), atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device():
    """With cuda:0 current, tensors on cuda:1 are computed on cuda:1: forward and both backward
    launches, in registers and in column tiles."""
    torch.cuda.set_device(0)
    for N in (384, WIDE):
        x, w, b, dy = _inputs((3, N), torch.bfloat16, "weight+bias")
        r = torch.randn_like(x)
        on = {d: [t.to(d) for t in (x, r, w, b)] for d in ("cuda:0", "cuda:1")}
        results = {d: _run(add_layer_norm, on[d], (dy.to(d), dy.to(d))) for d in on}
        assert all(t is None or t.device == torch.device("cuda:1") for t in results["cuda:1"])
        for t0, t1 in zip(results["cuda:0"], results["cuda:1"]):
            assert torch.equal(t0.cpu(), t1.cpu())


def test_every_kernel_launch_is_inside_its_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: a launch outside `on_device(t)` for a tensor t
    on another GPU reads and writes cuda:1's memory from cuda:0. Without a GPU, `on_device` is
    recorded here, and every kernel of both modules (LayerNorm's and attention's) must launch
    inside it for its first tensor's device."""
    from tinygpt.kernels import attention_dropout_mask, attention_qkv, flash_attention

    current, launches = [], []

    @contextlib.contextmanager
    def recorded_device(t):
        current.append(t.device)
        try:
            yield
        finally:
            current.pop()

    def recorded_launch(name, kernel):
        def at(grid):
            def launch(*args, **kwargs):
                tensor = next(a for a in args if torch.is_tensor(a))
                launches.append((name, current[-1] if current else None, tensor.device))
                return kernel[grid](*args, **kwargs)
            return launch
        return type("Launch", (), {"__getitem__": staticmethod(at)})()

    kernels = set()
    for module in (flash_attention, layernorm):
        monkeypatch.setattr(module, "on_device", recorded_device)
        for name, kernel in list(vars(module).items()):
            if name.endswith("_kernel"):
                kernels.add(name)
                monkeypatch.setattr(module, name, recorded_launch(name, kernel))
    x, w, b, dy = _inputs((2, WIDE), torch.float32, "weight+bias")  # column tiles: row sums
    _run(layer_norm, (x, w, b), (dy,))
    _run(add_layer_norm, (x[:, :40], torch.randn_like(x[:, :40]), w[:40], b[:40]),
         (dy[:, :40], dy[:, :40]))
    qkv = torch.randn(1, 16, 3, 2, 16, device=DEVICE, requires_grad=True)
    attention_qkv(qkv, dropout_p=0.1, seed=1).sum().backward()
    attention_dropout_mask(1, 2, 16, 16, 0.1, seed=1, device=DEVICE)
    assert {name for name, _, _ in launches} == kernels
    outside = [(name, inside, device) for name, inside, device in launches if inside != device]
    assert outside == [], f"launched outside their tensor's device: {outside}"


def _opcheck(op, args):
    # The interpreter reads real memory, so AOT tracing through the kernel needs CUDA.
    utils = None if DEVICE == "cuda" else ("test_schema", "test_autograd_registration",
                                           "test_faketensor")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(op, args, **kwargs)


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_registered_ops_pass_opcheck(out_dtype):
    x, w, b, _ = _inputs((5, 33), torch.float32, "weight+bias")
    r = torch.randn_like(x)
    w, b = w.requires_grad_(), b.requires_grad_()
    _opcheck(torch.ops.tinygpt.layer_norm_fwd.default,
             (x.clone().requires_grad_(), w, b, 1e-5, out_dtype))
    _opcheck(torch.ops.tinygpt.add_layer_norm_fwd.default,
             (x.clone().requires_grad_(), r.requires_grad_(), w, b, 1e-5, out_dtype))


def test_backward_op_passes_opcheck():
    x, w, b, dy = _inputs((5, 33), torch.float32, "weight+bias")
    mean, rstd = x.mean(-1), x.var(-1, correction=0).add(1e-5).rsqrt()
    dx, dr = torch.empty_like(x), torch.empty_like(x, dtype=torch.bfloat16)
    dw, db = torch.empty_like(w), torch.empty_like(b)
    _opcheck(torch.ops.tinygpt.layer_norm_bwd.default,
             (dy, x, torch.randn_like(x), w, mean, rstd, dx, dr, dw, db))


def test_torch_compile_forward_and_backward_equal_eager():
    """fullgraph=True fails on a graph break; the compiled forward and backward give eager's
    output and every gradient (x, residual, weight, bias), and the output is the reference's.
    On CUDA inductor compiles both passes; on the CPU only dynamo traces."""
    x, w, b, dy = _inputs((5, 33), torch.float32, "weight+bias")
    r = torch.randn_like(x)
    backend = "inductor" if DEVICE == "cuda" else "eager"

    def block(x, r, w, b):
        y, h = add_layer_norm(x, r, w, b, out_dtype=torch.float16)
        return layer_norm(y.float() + h, w, b)

    torch._dynamo.reset()
    compiled = _run(torch.compile(block, backend=backend, fullgraph=True), (x, r, w, b), [dy])
    eager = _run(block, (x, r, w, b), [dy])
    for name, c, e in zip(("out", "dx", "dr", "dw", "db"), compiled, eager):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5, msg=name)
    h = x + r
    expected = layer_norm_reference(layer_norm_reference(h, w, b).half().float() + h, w, b)
    torch.testing.assert_close(compiled[0], expected, atol=1e-3, rtol=1e-3)
