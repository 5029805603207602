"""The Triton attention against the float64 reference, with PyTorch's own error as the yardstick.

Runs on CUDA when present, otherwise in Triton's interpreter on the CPU (see conftest.py). Rule:
max |kernel - fp64 reference| is at most 2x (output) or 3x (gradients) the error of
F.scaled_dot_product_attention in the same dtype, plus a small atol.

bf16 in the interpreter: conftest.py widens bf16 `tl.dot` operands to fp32 (the interpreter's own
dot multiplies their bit patterns). The kernels' bf16 loads, stores, casts (p and dS rounded to
bf16 before their matmuls), masks and tiling are what run here; the products are exact, as a
tensor core's are, but fp32 accumulation happens in numpy's order, not the tensor core's, and
the yardstick is the CPU's SDPA, not the GPU's. Tensor-core numerics remain CUDA's to check.
fp32 dots that ask for tf32 get operands cut to tf32 there, so fp32's "ieee" is checked here too.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tinygpt.kernels import attention, attention_dropout_mask, attention_qkv
from tinygpt.kernels import flash_attention as attention_module
from tinygpt.kernels.reference import attention_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [8, 24, 40, 48, 80, 96, 256])
def test_any_head_dim(D, dtype):
    """Head dims that are not a power of two (or below 16) run padded: the padding is read as
    zeros and never written, so every element of the output and gradients is checked."""
    B, H, T = 1, 2, 37
    q, k, v = _qkv(B, H, T, T, D, dtype)
    do = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)
    ours = _run(lambda q, k, v: attention(q, k, v), q, k, v, do)
    torch_lp = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    q, k, v, do)
    exact = _run(lambda q, k, v: attention_reference(q, k, v, upcast=torch.float64), q, k, v, do)
    _assert_within_rule(ours, torch_lp, exact, dtype)


def keep_mask(B: int, H: int, T: int, S: int, dropout_p: float, seed: int) -> torch.Tensor:
    """The kernels' keep-mask, for its statistics: on a GPU from the kernel; in Triton's
    interpreter, which takes seconds per million weights, from numpy's copy of the kernels'
    generator with the kernels' own threshold, equal bit for bit
    (test_dropout_mask_is_philox_of_each_position)."""
    if DEVICE == "cuda":
        return attention_dropout_mask(B, H, T, S, dropout_p, seed, device=DEVICE)
    return philox_keep_mask(B, H, T, S, dropout_p, seed, attention_module.PHILOX_ROUNDS.value,
                            threshold=attention_module._dropout_args(dropout_p)[1])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_the_right_fraction(p):
    mask = keep_mask(4, 4, 256, 256, p, seed=torch.randint(0, 2**40, ()).item())
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


def _assert_dropout_matches_its_mask(q, k, v, do, p, causal):
    """Output and gradients with dropout p (fresh seed) against the reference given the mask
    `attention_dropout_mask` returns for that seed."""
    seed = torch.randint(0, 2**40, ()).item()
    B, H, T, _ = q.shape
    mask = attention_dropout_mask(B, H, T, k.shape[2], p, seed, device=DEVICE)

    def reference(upcast=None):
        return lambda q, k, v: attention_reference(q, k, v, causal=causal, dropout_p=p,
                                                   dropout_mask=mask, upcast=upcast)

    ours = _run(lambda q, k, v: attention(q, k, v, causal=causal, dropout_p=p, seed=seed),
                q, k, v, do)
    ref_lp = _run(reference(), q, k, v, do)
    exact = _run(reference(torch.float64), q, k, v, do)
    _assert_within_rule(ours, ref_lp, exact, q.dtype)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [17, 97, 200])
def test_dropout_matches_reference_with_its_mask(T, causal):
    B, H, D = 2, 2, 32
    q, k, v = _qkv(B, H, T, T, D, torch.float32)
    do = torch.randn(B, H, T, D, device=DEVICE)
    _assert_dropout_matches_its_mask(q, k, v, do, 0.2, causal)


@pytest.mark.parametrize("D", [24, 200])
def test_padded_head_dim_with_dropout_and_a_longer_key_cache(D):
    """Decoding's shape, T new queries against S > T cached keys (not causal), with dropout."""
    q, k, v = _qkv(2, 1, 5, 70, D, torch.float32)
    do = torch.randn(2, 1, 5, D, device=DEVICE)
    _assert_dropout_matches_its_mask(q, k, v, do, 0.3, causal=False)


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
        (((1, 1, 8, 257),) * 3, {}, ValueError, "head dim 257 is not supported"),
        (((1, 1, 8, 16), (1, 1, 8, 16), (1, 1, 9, 16)), {}, ValueError, "same shape"),
        (((1, 2, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16)), {}, ValueError, "must match q"),
        (((8, 16), (8, 16), (8, 16)), {}, ValueError, r"\(B, H, T, D\)"),
        (((1, 1, 8, 16),) * 3, {"dropout_p": 1.0}, ValueError, "dropout_p"),
        (((1, 1, 8, 16),) * 3, {"dropout_p": -0.1}, ValueError, r"in \[0, 1\), got -0.1"),
        (((256, 256, 1, 16),) * 3, {}, ValueError, "batch x heads = 256 x 256"),
        (((1, 1, 0, 16),) * 3, {}, ValueError, "non-empty"),
    ],
)
def test_misuse_is_named(shapes, kwargs, error, match):
    q, k, v = (torch.randn(s, device=DEVICE) for s in shapes)
    with pytest.raises(error, match=match):
        attention(q, k, v, **kwargs)


def test_float32_is_not_rounded_to_tf32():
    """fp32 inputs take full-precision dots (input_precision "ieee"); tf32's 10-bit mantissa
    would leave errors near 1e-3 of the largest value in the output and every gradient (the
    interpreter cuts tf32 operands as tensor cores do: conftest.py)."""
    q, k, v = _qkv(2, 2, 256, 256, 64, torch.float32) if CUDA else _qkv(1, 2, 80, 80, 32,
                                                                          torch.float32)
    do = torch.randn_like(q)
    ours = _run(lambda q, k, v: attention(q, k, v), q, k, v, do)
    exact = _run(lambda q, k, v: attention_reference(q, k, v, upcast=torch.float64), q, k, v, do)
    for name, o, e in zip(("out", "dq", "dk", "dv"), ours, exact):
        err = (o.double() - e.double()).abs().max().item()
        assert err <= 2e-5 * e.abs().max().item(), f"{name}: {err:.3g}"


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


@pytest.mark.parametrize("packed", [False, True], ids=["q,k,v", "packed qkv"])
def test_torch_compile_forward_and_backward_equal_eager(packed):
    """fullgraph=True fails on a graph break. With a fixed dropout seed, the compiled forward and
    backward give eager's output and gradient, and the output is the reference's with the
    kernel's mask. On CUDA inductor compiles both passes; on the CPU only dynamo traces
    (backend="eager"): AOT tracing would run the interpreter on fake tensors."""
    B, T, H, D = 1, 37, 2, 16
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE)
    do = torch.randn(B, H, T, D, device=DEVICE)

    def split(qkv):
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)

    def fn(qkv):
        if packed:
            return attention_qkv(qkv, dropout_p=0.1, seed=4)
        return attention(*split(qkv), dropout_p=0.1, seed=4)

    def run(f):
        leaf = qkv.clone().requires_grad_(True)
        out = f(leaf)
        out.backward(do)
        return out.detach(), leaf.grad

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor" if CUDA else "eager", fullgraph=True)
    (out, grad), (eager_out, eager_grad) = run(compiled), run(fn)
    torch.testing.assert_close(out, eager_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, eager_grad, atol=1e-6, rtol=1e-6)
    mask = attention_dropout_mask(B, H, T, T, 0.1, seed=4, device=DEVICE)
    expected = attention_reference(*split(qkv), dropout_p=0.1, dropout_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


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


# --- dropout: one Philox draw decides eight weights --------------------------------------------


def philox_keep_mask(B: int, H: int, T: int, S: int, dropout_p: float, seed: int,
                     rounds: int, threshold: int | None = None) -> torch.Tensor:
    """The keep-mask (bool, (B, H, T, S)) that kernels/flash_attention.py documents, from numpy's
    Philox4x32 with `rounds` rounds: query 16c + 8z + d and key 16a + 8x + 2b + y keep their
    weight when the 16-bit half y of word 2x + z of the draw for counter (8c + d, 4a + b, bh, 0)
    under key (seed's low, high 32 bits) reaches `threshold`, by default round(p * 2**16)."""
    if threshold is None:
        threshold = min(round(dropout_p * 2**16), 2**16 - 1)
    lo32 = np.uint64(0xFFFFFFFF)
    c0, c1, c2 = np.meshgrid(np.arange(-(-T // 16) * 8, dtype=np.uint64),
                             np.arange(-(-S // 16) * 4, dtype=np.uint64),
                             np.arange(B * H, dtype=np.uint64), indexing="ij")
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed % 2**64 & 0xFFFFFFFF), np.uint64(seed % 2**64 >> 32)
    for _ in range(rounds):
        hi_lo_b = np.uint64(0xCD9E8D57) * c2
        hi_lo_a = np.uint64(0xD2511F53) * c0
        c0, c1, c2, c3 = ((hi_lo_b >> np.uint64(32)) ^ c1 ^ k0, hi_lo_b & lo32,
                          (hi_lo_a >> np.uint64(32)) ^ c3 ^ k1, hi_lo_a & lo32)
        k0 = (k0 + np.uint64(0x9E3779B9)) & lo32
        k1 = (k1 + np.uint64(0xBB67AE85)) & lo32
    words = np.stack([c0, c1, c2, c3], axis=-1)  # (8c + d, 4a + b, bh, 2x + z)
    keep = np.stack([words & np.uint64(0xFFFF), words >> np.uint64(16)], -1) >= threshold
    nc, na = c0.shape[0] // 8, c0.shape[1] // 4
    keep = keep.reshape(nc, 8, na, 4, B * H, 2, 2, 2)  # (c, d, a, b, bh, x, z, y)
    keep = keep.transpose(4, 0, 6, 1, 2, 5, 3, 7)  # (bh, c, z, d, a, x, b, y)
    keep = keep.reshape(B, H, nc * 16, na * 16)[:, :, :T, :S]  # (B, H, T, S)
    return torch.from_numpy(np.ascontiguousarray(keep))


@pytest.mark.parametrize("B,H,T,S,p,seed", [(1, 2, 70, 90, 0.5, 12345), (2, 1, 33, 130, 0.2, -7),
                                            (1, 1, 16, 16, 0.9, 2**62 + 3),
                                            (1, 2, 32, 48, 1 - 2**-18, 3)])  # threshold clamped
def test_dropout_mask_is_philox_of_each_position(B, H, T, S, p, seed):
    """The kernels' mask is the documented map of Philox draws, bit for bit, at odd sizes and any
    64-bit seed: so the statistics of numpy's copy below are the kernels'."""
    mask = attention_dropout_mask(B, H, T, S, p, seed, device=DEVICE).cpu()
    rounds = attention_module.PHILOX_ROUNDS.value
    assert torch.equal(mask, philox_keep_mask(B, H, T, S, p, seed, rounds))


def keep_bit_z_scores(mask: torch.Tensor, reach: int = 31) -> dict[tuple[int, int], float]:
    """{(di, dj): z} for the correlation between the keep bits of (query i, key j) and (i + di,
    j + dj), at every offset up to `reach` (a 16 x 16 block's draws and its neighbours'); each z
    is standard normal when the bits are independent. One FFT gives every offset."""
    x = mask.double()
    x = (x - x.mean()) / x.std()  # (B, H, T, S)
    B, H, T, S = x.shape
    size = (T + reach, S + reach)  # zero padding: no offset wraps around
    f = torch.fft.rfft2(x, s=size)
    products = torch.fft.irfft2(f * f.conj(), s=size).sum((0, 1))  # sum of x[i, j] x[i+di, j+dj]
    z = {}
    for di in range(-reach, reach + 1):
        for dj in range(0 if di > 0 else 1, reach + 1):
            n = B * H * (T - abs(di)) * (S - dj)
            z[(di, dj)] = products[-di % size[0], dj].item() / n**0.5
    return z


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_decisions_are_independent(p):
    """Keep bits at every query and key offset within a 16 x 16 block and into its neighbours
    (queries {i, i+8} and keys {j, j+1, j+8, j+9} share a Philox draw), and those of other heads,
    batches and seeds, are uncorrelated: |z| < 5.5 at each of the 2,000 offsets (2**20 bits;
    5.5 standard errors is 0.005). Two groups of keys sharing a draw correlate fully."""
    seed = torch.randint(0, 2**40, ()).item()
    mask = keep_mask(2, 2, 512, 512, p, seed).float()
    other = keep_mask(2, 2, 512, 512, p, seed + 1).float()
    z = keep_bit_z_scores(mask)
    worst = max(z, key=lambda k: abs(z[k]))
    assert abs(z[worst]) < 5.5, f"offset {worst}: z = {z[worst]:.1f}"

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return ((a * b).mean() / (a.std() * b.std())).item()

    pairs = {
        "head 0, head 1": (mask[:, 0], mask[:, 1]),
        "batch 0, batch 1": (mask[0], mask[1]),
        "seed, seed + 1": (mask, other),
        "(i, j), (j, i)": (mask, mask.transpose(-1, -2)),
    }
    for name, (a, b) in pairs.items():
        assert abs(corr(a, b)) < 0.01, name
    # each of the eight 16-bit slices of a draw keeps 1 - p of its weights
    by_slice = mask.view(2, 2, 32, 2, 8, 32, 2, 4, 2).mean(dim=(0, 1, 2, 4, 5, 7))  # (z, x, y)
    assert (by_slice - (1 - p)).abs().max() < 0.01


def test_dropout_bits_are_independent_over_16m_draws():
    """A Philox with too few rounds shows only over many draws: at 2**24 keep bits (numpy's copy
    of the kernels' generator, equal bit for bit above), 6 rounds correlate keys j, j+2 at
    z = -14 and 5 rounds at z = 162; the kernels' 7 reach 3.5, what 1,984 offsets of independent
    bits give."""
    rounds = attention_module.PHILOX_ROUNDS.value
    z = keep_bit_z_scores(philox_keep_mask(4, 4, 1024, 1024, 0.5, seed=2**40 + 99,
                                           rounds=rounds))
    worst = max(z, key=lambda k: abs(z[k]))
    assert abs(z[worst]) < 5.5, f"{rounds} rounds, offset {worst}: z = {z[worst]:.1f}"


def test_dropout_probability_is_exact_to_16_bits():
    """The keep decision compares 16 random bits with round(p * 2**16): p = 1 - 2**-16 keeps
    one weight in 2**16, and a p below 2**-17 drops nothing."""
    assert not attention_dropout_mask(1, 1, 16, 16, 1e-6, seed=3, device=DEVICE).logical_not().any()
    for p in (1 - 2**-16, 1 - 2**-18):  # the second rounds to 2**16: clamped, not wrapped to 0
        mask = keep_mask(1, 4, 512, 512, p, seed=3)
        assert 0 < mask.sum().item() < 60  # 2**20 draws at 2**-16: 16 expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dropout_in_16_bit_tiles_on_strided_views_matches_its_mask(causal, dtype):
    """The model's training path: dropout 0.2 on q, k, v viewed out of one projection, in 16-bit
    tiles (forward 128 x 64, dK/dV 32 x 128, dQ 128 x 32), so every kernel regenerates the mask
    of several tiles, transposed in dK/dV. On CUDA at the model's shape."""
    B, H, T, D = (4, 6, 256, 64) if CUDA else (1, 2, 150, 64)
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)
    do = torch.randn(B, H, T, D, device=DEVICE, dtype=dtype)
    _assert_dropout_matches_its_mask(q, k, v, do, 0.2, causal)


# --- packed qkv ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_packed_qkv_equals_the_three_tensor_path(dropout_p):
    """attention_qkv runs the same kernels on the same views, so the output and the gradient are
    bitwise those of attention(q, k, v); the gradient arrives as one (B, T, 3, H, D) tensor."""
    B, T, H, D = 2, 77, 3, 32
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE, dtype=torch.float16, requires_grad=True)
    split = qkv.detach().clone().requires_grad_(True)
    do = torch.randn(B, H, T, D, device=DEVICE, dtype=torch.float16)
    packed = attention_qkv(qkv, dropout_p=dropout_p, seed=11)
    q, k, v = split.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)
    separate = attention(q, k, v, dropout_p=dropout_p, seed=11)
    (packed * do).sum().backward()
    (separate * do).sum().backward()
    assert torch.equal(packed, separate)
    assert qkv.grad.shape == (B, T, 3, H, D) and torch.isfinite(qkv.grad).all()
    assert torch.equal(qkv.grad, split.grad)


def test_packed_qkv_matches_the_reference():
    B, T, H, D = 1, 93, 2, 64
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE, dtype=torch.float16)
    do = torch.randn(B, H, T, D, device=DEVICE, dtype=torch.float16)

    def packed(fn):
        leaf = qkv.detach().clone().requires_grad_(True)
        out = fn(leaf)
        out.backward(do.to(out.dtype))
        dq, dk, dv = leaf.grad.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D)
        return [out.detach(), dq, dk, dv]

    def split(fn):
        return lambda qkv: fn(*qkv.permute(2, 0, 3, 1, 4).unbind(0))

    ours = packed(lambda qkv: attention_qkv(qkv))
    torch_lp = packed(split(lambda q, k, v: F.scaled_dot_product_attention(q, k, v,
                                                                          is_causal=True)))
    exact = packed(split(lambda q, k, v: attention_reference(q, k, v, upcast=torch.float64)))
    _assert_within_rule(ours, torch_lp, exact, torch.float16)


@pytest.mark.parametrize("shape", [(2, 8, 3, 16), (2, 8, 2, 1, 16)])
def test_packed_qkv_shape_is_checked(shape):
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, D\)"):
        attention_qkv(torch.randn(shape, device=DEVICE))


def test_packed_op_passes_opcheck():
    qkv = torch.randn(1, 37, 3, 2, 16, device=DEVICE, requires_grad=True)
    seed = torch.tensor([5], device=DEVICE)
    kwargs = {} if CUDA else {"test_utils": ("test_schema", "test_autograd_registration",
                                             "test_faketensor")}
    torch.library.opcheck(torch.ops.tinygpt.attention_qkv_fwd.default,
                          (qkv, True, 0.0, seed, 0.25), **kwargs)


# --- robustness ---------------------------------------------------------------------------------

_OVERFLOW_SCRIPT = """
import sys, torch
from tinygpt.kernels import attention
from tinygpt.kernels.reference import attention_reference
device = sys.argv[1]
T, D = 3, 16
# Rows 2**30 + 16 elements apart: row 2 starts past 2**31, where 32-bit offsets wrap.
q = torch.empty_strided((1, 1, T, D), (0, 0, 2**30 + 16, 1), dtype=torch.float16, device=device)
values = torch.randn(1, 1, T, D, dtype=torch.float16, device=device)
with torch.no_grad():
    q.copy_(values)
q.requires_grad_(True)
k, v, do = (torch.randn(1, 1, T, D, dtype=torch.float16, device=device) for _ in range(3))
out = attention(q, k, v)
out.backward(do)
exact = values.double().requires_grad_(True)
ref = attention_reference(exact, k, v, upcast=torch.float64)
ref.backward(do.double())
print((out.double() - ref).abs().max().item(), (q.grad.double() - exact.grad).abs().max().item())
"""


def test_offsets_past_two_to_the_31_elements(run_command):
    """A view whose rows lie more than 2**31 elements apart (4 GiB of address space, untouched):
    32-bit offsets would read and write the wrong rows, or crash, so it runs in a child."""
    import sys

    proc = run_command([sys.executable, "-c", _OVERFLOW_SCRIPT, DEVICE], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out_err, grad_err = map(float, proc.stdout.split())
    assert out_err < 2e-3 and grad_err < 2e-3


def test_explicit_seed_is_checked():
    q = torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="64 bits"):
        attention(q, q, q, dropout_p=0.1, seed=2**64)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("seed", [7, None], ids=["explicit seed", "drawn seed"])
def test_cuda_graph_captures_dropout(seed):
    """A training step with dropout captured once and replayed: an explicit seed is filled on the
    device (no host copy, which capture forbids) and replays exactly; a drawn seed comes from the
    CUDA generator, which advances on every replay."""
    qkv = torch.randn(4, 256, 3, 6, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(4, 6, 256, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        qkv.grad = None
        out = attention_qkv(qkv, dropout_p=0.2, seed=seed)
        out.backward(do)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    qkv.grad = None
    with torch.cuda.graph(graph):
        out = attention_qkv(qkv, dropout_p=0.2, seed=seed)
        out.backward(do)
    graph.replay()
    first, first_grad = out.clone(), qkv.grad.clone()
    graph.replay()
    assert torch.isfinite(first).all() and torch.isfinite(first_grad).all()
    if seed is None:
        assert not torch.equal(out, first)
    else:
        assert torch.equal(out, first) and torch.equal(qkv.grad, first_grad)
        eager = step()
        assert torch.equal(eager, first) and torch.equal(qkv.grad, first_grad)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device():
    """With cuda:0 current, tensors on cuda:1 are computed on cuda:1."""
    qkv1 = torch.randn(2, 64, 3, 2, 64, device="cuda:1", dtype=torch.bfloat16,
                       requires_grad=True)
    qkv0 = qkv1.detach().to("cuda:0").requires_grad_(True)
    torch.cuda.set_device(0)
    out1, out0 = attention_qkv(qkv1, seed=3, dropout_p=0.1), attention_qkv(qkv0, seed=3,
                                                                          dropout_p=0.1)
    out1.sum().backward()
    out0.sum().backward()
    assert out1.device == torch.device("cuda:1")
    assert torch.equal(out1.cpu(), out0.cpu()) and torch.equal(qkv1.grad.cpu(), qkv0.grad.cpu())
