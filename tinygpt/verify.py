"""The fused kernels checked on the machine they run on, and training steps timed per backend.

`check_kernels` runs each fused op the way the model calls it (packed-qkv attention with and without
dropout, attention over a key/value cache as decoding calls it, add+LayerNorm and LayerNorm writing
the autocast dtype) on random inputs (seeded: a report repeats), and judges its output and every
gradient by the test suite's rule: the largest error against the fp64 reference may be at most
`factor` times PyTorch's own error in the same dtypes (2 for outputs, 3 for attention's gradients),
plus a small absolute floor. PyTorch's own error comes from `scaled_dot_product_attention` and
`layer_norm`, or, where those cannot take the kernel's dropout mask, from the reference math in the
low-precision dtype.

`time_steps` times full training steps (forward, backward, clipping, the run's optimizers, under
autocast) of one model on several backends, interleaved round by round so that a clock or thermal
drift reaches all of them alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from tinygpt import kernels
from tinygpt.kernels.reference import attention_reference, layer_norm_reference

from .config import ModelConfig, TrainConfig
from .memory import is_out_of_memory
from .model import build_model
from .optim import make_optimizer

# Absolute error floors of the rule, by the dtype of the tensor judged (the test suite's). Layer
# norm's floor scales with the largest exact value.
ATTENTION_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LAYER_NORM_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
EPS = 1e-5  # the model's LayerNorm eps
DROPOUT_CHECKED = 0.2  # the dropout checked when the model has none
# The fp64 reference holds a few (B, H, T, S) score tensors: the batch checked is cut until one
# fits in this many elements (256 MiB in fp64). Launch settings do not depend on the batch.
REFERENCE_SCORES = 2**25


@dataclasses.dataclass(frozen=True)
class Shape:
    """What one round of checks runs at: `batch` sequences of `block` tokens, `heads` heads of
    `head_dim` (LayerNorm width heads x head_dim), in `dtype`, with the model's `bias` and
    attention `dropout`."""

    batch: int
    block: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    bias: bool = False
    dropout: float = 0.0

    @classmethod
    def of(cls, model_cfg: ModelConfig, batch: int, dtype: torch.dtype) -> Shape:
        """The shape a GPT of `model_cfg` trains at with batches of `batch`, in `dtype`."""
        return cls(batch, model_cfg.block_size, model_cfg.n_head,
                   model_cfg.n_embd // model_cfg.n_head, dtype, model_cfg.bias, model_cfg.dropout)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"B={self.batch} T={self.block} H={self.heads} D={self.head_dim} "
                f"N={self.width} {dtype}")

    def capped(self) -> Shape:
        """This shape with the batch halved until the fp64 reference's scores fit."""
        batch = self.batch
        while batch > 1 and batch * self.heads * self.block**2 > REFERENCE_SCORES:
            batch = (batch + 1) // 2
        return dataclasses.replace(self, batch=batch)


@dataclasses.dataclass(frozen=True)
class OpCheck:
    """One op's verdict: its worst output or gradient (`tensor`), whose error was `ratio` times
    PyTorch's own, against the `limit` the rule allows."""

    op: str
    passed: bool
    tensor: str
    ratio: float
    limit: float
    note: str = ""

    def reason(self) -> str:
        """What decided the verdict, in words."""
        if math.isinf(self.ratio):
            return f"{self.tensor}: {self.note}" if self.tensor else self.note
        floor = ", within the rule's absolute floor" if self.passed and self.ratio > self.limit \
            else ""
        words = f"worst {self.tensor} {self.ratio:.2f}x torch's error (limit {self.limit:g}x" \
                f"{floor})"
        return words + (f"; {self.note}" if self.note else "")

    def describe(self) -> str:
        return f"{'pass' if self.passed else 'FAIL'}  {self.op}: {self.reason()}"


def _judge(op: str, names: Sequence[str], ours, torch_lp, exact, factors: Sequence[float],
           floors: Sequence[float], note: str = "") -> OpCheck:
    """The rule over every tensor: |ours - exact| <= factor * |torch - exact| + floor, in max
    norm. Reports the tensor closest to (or furthest past) its limit."""
    worst = None
    for name, o, t, e, factor, floor in zip(names, ours, torch_lp, exact, factors, floors):
        if o.shape != e.shape or o.dtype != t.dtype:
            return OpCheck(op, False, name, float("inf"), factor,
                           f"returned {tuple(o.shape)} {o.dtype}, expected {tuple(e.shape)} "
                           f"{t.dtype}")
        if not torch.isfinite(o).all():
            return OpCheck(op, False, name, float("inf"), factor, "non-finite values")
        err = (o.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        score = err / (factor * torch_err + floor)  # passes at 1 or below
        ratio = err / torch_err if torch_err > 0 else (0.0 if err == 0 else float("inf"))
        if worst is None or score > worst[0]:
            worst = (score, name, ratio, factor)
    score, name, ratio, factor = worst
    return OpCheck(op, score <= 1.0, name, ratio, factor, note)


def _run(fn: Callable, inputs: Sequence[torch.Tensor | None], grads_out: Sequence[torch.Tensor]
         ) -> list[torch.Tensor]:
    """Outputs of fn(*inputs), then the gradient of every input that is not None, after
    backpropagating `grads_out` through the outputs."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads_out)])
    return [o.detach() for o in outs] + [t.grad for t in leaves if t is not None]


def _split(qkv: torch.Tensor) -> list[torch.Tensor]:
    return list(qkv.permute(2, 0, 3, 1, 4).unbind(0))  # 3 x (B, H, T, D) views


def _attention_packed(shape: Shape, device: torch.device, dropout: float) -> OpCheck:
    """`attention_qkv` on a (B, T, 3, H, D) projection, causal, as the model's training calls it;
    with dropout, against the reference given `attention_dropout_mask`'s mask for the seed, which
    the backward kernels must regenerate exactly for the gradients to match."""
    B, T, H, D = shape.batch, shape.block, shape.heads, shape.head_dim
    qkv = torch.randn(B, T, 3, H, D, device=device, dtype=shape.dtype)
    do = torch.randn(B, H, T, D, device=device, dtype=shape.dtype)
    seed = int(torch.randint(0, 2**40, ()).item())
    mask, note = None, ""
    if dropout > 0:
        mask = kernels.attention_dropout_mask(B, H, T, T, dropout, seed, device=device)
        kept = mask.float().mean().item()
        # 6 standard errors of a fraction of n independent draws, and the 2**-17 rounding of p
        allowed = 6 * (dropout * (1 - dropout) / mask.numel()) ** 0.5 + 2**-17
        note = (f"kept {kept:.4f} of the weights (expected {1 - dropout:.4f}); judged against "
                "attention_dropout_mask's mask")
        if abs(kept - (1 - dropout)) > allowed:
            return OpCheck(_packed_name(dropout), False, "dropout mask", float("inf"), 1.0,
                           note + f", off by more than {allowed:.4f}")

    def split_grads(fn):
        out, dqkv = _run(fn, [qkv], [do])
        return [out, *_split(dqkv)]  # the packed gradient as dq, dk, dv

    def reference(upcast):
        return lambda t: attention_reference(*_split(t), dropout_p=dropout, dropout_mask=mask,
                                             upcast=upcast)

    ours = split_grads(lambda t: kernels.attention_qkv(t, dropout_p=dropout, seed=seed))
    if mask is None:
        torch_lp = split_grads(lambda t: F.scaled_dot_product_attention(*_split(t),
                                                                        is_causal=True))
    else:
        torch_lp = split_grads(reference(None))
    exact = split_grads(reference(torch.float64))
    floor = ATTENTION_ATOL[shape.dtype]
    return _judge(_packed_name(dropout), ("out", "dq", "dk", "dv"), ours, torch_lp, exact,
                  (2, 3, 3, 3), (floor,) * 4, note)


def _packed_name(dropout: float) -> str:
    return "attention_qkv (causal" + (f", dropout {dropout:g})" if dropout else ")")


def _attention_decode(shape: Shape, device: torch.device) -> OpCheck:
    """`attention(causal=False)` as a decoding step calls it: one new query, a view of a
    projection, against the T - 1 keys and values cached so far, views of (B, H, T, D) buffers."""
    B, T, H, D = shape.batch, shape.block, shape.heads, shape.head_dim
    S = max(1, T - 1)
    q = _split(torch.randn(B, 1, 3, H, D, device=device, dtype=shape.dtype))[0]  # (B, H, 1, D)
    k_cache, v_cache = torch.randn(2, B, H, T, D, device=device, dtype=shape.dtype)
    do = torch.randn(B, H, 1, D, device=device, dtype=shape.dtype)
    inputs = [q, k_cache[:, :, :S], v_cache[:, :, :S]]  # (B, H, 1, D), 2 x (B, H, S, D)
    ours = _run(lambda q, k, v: kernels.attention(q, k, v, causal=False), inputs, [do])
    torch_lp = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), inputs, [do])
    exact = _run(lambda q, k, v: attention_reference(q, k, v, causal=False,
                                                     upcast=torch.float64), inputs, [do])
    floor = ATTENTION_ATOL[shape.dtype]
    return _judge(f"attention (decoding: 1 query, {S} cached keys)", ("out", "dq", "dk", "dv"),
                  ours, torch_lp, exact, (2, 3, 3, 3), (floor,) * 4)


def _layer_norm(shape: Shape, device: torch.device, out_dtype: torch.dtype | None,
                with_residual: bool) -> OpCheck:
    """add_layer_norm(branch, residual) as a block calls it (the branch in the activations'
    dtype, the residual stream and the parameters in fp32), or layer_norm(embeddings) as the
    first block does, writing `out_dtype` (the autocast dtype; None: the input's)."""
    B, T, N = shape.batch, shape.block, shape.width
    x_dtype = shape.dtype if with_residual else torch.float32
    x = (torch.randn(B, T, N, device=device) * 2.0 + 0.5).to(x_dtype)  # (B, T, N)
    r = torch.randn(B, T, N, device=device) * 3.0 - 1.0 if with_residual else None
    w = 1.0 + 0.5 * torch.randn(N, device=device)
    b = 0.5 * torch.randn(N, device=device) if shape.bias else None
    h_dtype = torch.float32
    y_dtype = out_dtype or h_dtype
    dy = torch.randn(B, T, N, device=device).to(y_dtype)
    dh = torch.randn(B, T, N, device=device)  # from the residual stream's later uses

    def fused(x, r, w, b):
        if r is None:
            return kernels.layer_norm(x, w, b, EPS, out_dtype=out_dtype), x
        return kernels.add_layer_norm(x, r, w, b, EPS, out_dtype=out_dtype)

    def unfused(norm, cast):
        def fn(x, r, w, b):
            h = x if r is None else x + r
            return norm(h, w, b).to(cast or h.dtype), h
        return fn

    torch_norm = unfused(lambda h, w, b: F.layer_norm(h, (N,), w, b, EPS), out_dtype)
    exact_norm = unfused(lambda h, w, b: layer_norm_reference(h, w, b, EPS), torch.float64)
    inputs = [x, r, w, b]
    grads_out = [dy, dh]
    ours = _run(fused, inputs, grads_out)
    torch_lp = _run(torch_norm, inputs, grads_out)
    exact = _run(exact_norm, [t if t is None else t.double() for t in inputs], grads_out)
    names = ["y", "h", "dx"] + ["dresidual"] * with_residual + ["dw"] + ["db"] * shape.bias
    dtypes = [y_dtype, h_dtype, x_dtype] + [torch.float32] * (len(names) - 3)
    floors = [LAYER_NORM_ATOL[d] * max(1.0, e.abs().max().item()) for d, e in zip(dtypes, exact)]
    if not with_residual:  # h is x itself: nothing of the kernel's to judge
        names, ours, torch_lp, exact, floors = (
            [v[0]] + v[2:] for v in (names, ours, torch_lp, exact, floors))
    out_words = str(y_dtype).removeprefix("torch.")
    in_words = " + ".join(str(d).removeprefix("torch.")
                          for d in ([x_dtype, torch.float32] if with_residual else [x_dtype]))
    op = f"{'add_layer_norm' if with_residual else 'layer_norm'} ({in_words} -> {out_words})"
    return _judge(op, names, ours, torch_lp, exact, (2,) * len(names), floors)


def check_kernels(shape: Shape, device: torch.device, out_dtype: torch.dtype | None,
                  between: Callable[[], None] = lambda: None) -> list[OpCheck]:
    """Every fused op at `shape` on `device` (`out_dtype`: the autocast dtype LayerNorm writes,
    None without autocast), calling `between()` before each (a stop request may raise there).
    An op that raises fails with the error's first line; running out of memory propagates.
    Torch's random streams are left as they were."""
    dropout = shape.dropout or DROPOUT_CHECKED
    checks = [
        (_packed_name(0.0), lambda: _attention_packed(shape, device, 0.0)),
        (_packed_name(dropout), lambda: _attention_packed(shape, device, dropout)),
        ("attention (decoding)", lambda: _attention_decode(shape, device)),
        ("add_layer_norm", lambda: _layer_norm(shape, device, out_dtype, with_residual=True)),
        ("layer_norm", lambda: _layer_norm(shape, device, out_dtype, with_residual=False)),
    ]
    results = []
    cuda = device.type == "cuda"
    with torch.random.fork_rng([device] if cuda else [], device_type="cuda"):
        torch.manual_seed(0)
        for op, check in checks:
            between()
            try:
                results.append(check())
            except Exception as e:
                if is_out_of_memory(e):
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                results.append(OpCheck(op, False, "", float("inf"), 0.0,
                                       f"raised {type(e).__name__}: {first}"[:300]))
    return results


def worst(checks: Sequence[OpCheck]) -> OpCheck:
    """The failed check to name (the first), or the passed one nearest its limit."""
    failed = [c for c in checks if not c.passed]
    return failed[0] if failed else max(checks, key=lambda c: c.ratio / c.limit)


def time_steps(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device,
               amp_dtype: torch.dtype | None, backends: Sequence[str], compile: bool = False,
               rounds: int = 5, warmup: int = 2, between: Callable[[], None] = lambda: None
               ) -> dict[str, list[float]]:
    """Milliseconds of each of `rounds` training steps per backend, at `cfg`'s batch size with
    its optimizers, one model switching backend between steps (they share no state but the
    weights), after `warmup` steps each (which compile, with `compile`); `between()` is called
    before each step. Torch's random streams are left as they were."""
    cuda = device.type == "cuda"
    times: dict[str, list[float]] = {b: [] for b in backends}
    with torch.random.fork_rng([device] if cuda else [], device_type="cuda"):
        torch.manual_seed(0)
        model = build_model(model_cfg, backends[0]).to(device)
        optimizer = make_optimizer(model, cfg, device)
        step_model = torch.compile(model) if compile else model
        tokens = (2, cfg.batch_size, model_cfg.block_size)
        x, y = torch.randint(0, model_cfg.vocab_size, tokens, device=device)  # (B, T) each
        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())

        def step(backend: str) -> float:
            between()
            model.backend = backend  # torch.compile guards on it: one graph per backend
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with autocast:
                _, loss = step_model(x, y)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            return 1000 * (time.perf_counter() - start)

        for backend in backends:
            for _ in range(warmup):
                step(backend)
        for r in range(rounds):
            for backend in backends if r % 2 == 0 else reversed(backends):
                times[backend].append(step(backend))
    return times


def median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {backend: statistics.median(ms) for backend, ms in times.items()}
