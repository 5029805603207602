"""The optimizers and their schedule: AdamW for every parameter, or Muon for the blocks' weight
matrices with AdamW for the rest; one warm-up and decay drives both.

Muon (Keller Jordan, 2024) moves a weight matrix along its Nesterov momentum made orthogonal: the
momentum, scaled to unit Frobenius norm, goes through a few odd polynomials X <- aX + b(XX^T)X +
c(XX^T)^2 X, which take every singular value towards 1 whatever it was, so that a step changes the
matrix by as much in its rarely used directions as in its dominant ones. The polynomials are
Polar Express's (Amsel, Persson, Musco and Gower, 2025): one per iteration, each the best for the
range of singular values the previous ones left, so that fewer iterations get as close to 1 as
Keller Jordan's fixed one did in five. All matrices of a shape go through one batched product.

The products run in bf16 where bf16 matrix units make them fast (`newton_schulz_precision`), in
fp32 elsewhere: a CPU without such units emulates bf16 at several times fp32's cost. In fp32,
a wide matrix (cols above 1.5x rows) iterates on its small Gram matrix XX^T instead (Gram
Newton-Schulz, Dao AI Lab 2026): fewer FLOPs, for about 5 of fp32's bits (bf16 has 8 in all;
in bf16 the Gram form needs restarts, so it runs the direct one).

Embeddings, the tied head and LayerNorm gains are not hidden matrices: Muon's uniform step does
not suit them, and AdamW keeps them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import torch

from .config import TrainConfig
from .devices import cpu_bf16_units
from .threads import count_kept, plural

NS_EPS = 1e-7
# Polar Express's design: the polynomials take singular values in [LOWEST, 1] (of the momentum
# over its Frobenius norm, itself over 1 + SAFETY) towards 1; SAFETY keeps rounding from pushing a
# value past where the next polynomial is made for; below CUSHION x the top, a polynomial is not
# made steeper (its slope at 0 would grow without bound for little gain).
LOWEST, SAFETY, CUSHION = 1e-3, 0.02, 0.02
GRAM_ASPECT = 1.5  # the Gram form takes fewer FLOPs for matrices wider than this, at any count


def _best_quintic(low: float, high: float) -> tuple[float, float, float]:
    """The odd quintic p(x) = ax + bx^3 + cx^5 closest to 1 over [low, high] in the max norm,
    by Remez exchange: the error 1 - p equioscillates at the ends and at p's two critical points
    in between."""
    if low / high > 1 - 5e-6:  # the interval is a point: p is Newton-Schulz's own, scaled to it
        return 15 / 8 / high, -10 / 8 / high**3, 3 / 8 / high**5
    nodes = [low, (3 * low + high) / 4, (low + 3 * high) / 4, high]
    for _ in range(100):
        rows = [[x, x**3, x**5, (-1) ** i] for i, x in enumerate(nodes)]  # p(x_i) + (-1)^i E = 1
        a, b, c, _ = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64),
                                        torch.ones(4, dtype=torch.float64)).tolist()
        root = math.sqrt(9 * b * b - 20 * a * c)  # p'(x) = a + 3bx^2 + 5cx^4 = 0 at x^2 =
        inner = sorted(math.sqrt((-3 * b + sign * root) / (10 * c)) for sign in (-1, 1))
        moved = max(abs(x - y) for x, y in zip(inner, nodes[1:3]))
        nodes = [low, *inner, high]
        if moved < 1e-15:
            break
    return a, b, c


@functools.cache
def polar_express(steps: int) -> tuple[tuple[float, float, float], ...]:
    """Polar Express's coefficients (a, b, c) for `steps` iterations, each polynomial the best
    for the interval of singular values its predecessors leave (greedy, as the paper's), with
    SAFETY and CUSHION as modded-nanogpt's (its five: `polar_express(5)`)."""
    low, high, found = LOWEST, 1.0, []
    for i in range(steps):
        a, b, c = _best_quintic(max(low, CUSHION * high), high)
        p = lambda x: a * x + b * x**3 + c * x**5  # noqa: E731
        if low < CUSHION * high:  # made for [CUSHION, high]: centred on 1 over [low, high] again
            scale = 2 / (p(low) + p(high))
            a, b, c = a * scale, b * scale, c * scale
        if i < steps - 1:  # p(x / (1 + SAFETY)): room for rounding before the next polynomial
            s = 1 + SAFETY
            a, b, c = a / s, b / s**3, c / s**5
        found.append((a, b, c))
        low = a * low + b * low**3 + c * low**5
        high = 2 - low
    return tuple(found)


def lr_at(it: int, cfg: TrainConfig) -> float:
    """AdamW's rate: linear warm-up to `lr`, cosine or linear decay (`lr_decay`) to `min_lr` at
    `lr_decay_iters`, then flat. Muon's is this times muon_lr / lr."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    if cfg.lr_decay == "linear":
        left = 1.0 - progress
    else:
        left = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + left * (cfg.lr - cfg.min_lr)


def orthogonalize(m: torch.Tensor, coefficients: Sequence[tuple[float, float, float]],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A stack of matrices (n, rows, cols) with the same singular vectors and singular values
    taken towards 1 by the odd quintics `coefficients`, one an iteration, computed in `dtype`."""
    tall = m.size(-2) > m.size(-1)
    x = m.to(dtype)
    if tall:
        x = x.mT  # (n, s, l) with s <= l, so that the Gram matrices are the small s x s ones
    norm = x.norm(dim=(-2, -1), keepdim=True) * (1 + SAFETY)
    x = x / norm.clamp_min(NS_EPS)  # every singular value below 1 / (1 + SAFETY)
    gram = (dtype != torch.bfloat16 and len(coefficients) > 1
            and x.size(-1) > GRAM_ASPECT * x.size(-2))
    x = (_gram_iterations if gram else _iterations)(x, coefficients)
    return x.mT if tall else x


def _iterations(x: torch.Tensor, coefficients) -> torch.Tensor:
    """X <- aX + (bG + cG^2)X with G = XX^T: 4 s^2 l + 2 s^3 FLOPs an iteration, x: (n, s, l)."""
    for a, b, c in coefficients:
        gram = x @ x.mT  # (n, s, s)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # bG + cG^2, (n, s, s)
        x = torch.baddbmm(x, poly, x, beta=a)  # aX + (bG + cG^2)X, (n, s, l)
    return x


def _gram_iterations(x: torch.Tensor, coefficients) -> torch.Tensor:
    """The same iterations on G = XX^T alone, x: (n, s, l). Each X_k is Q_k X_0 with Q_k a
    polynomial in G_0; with P = aI + bG + cG^2, X <- PX becomes Q <- PQ and G <- PGP, all s x s.
    Two s x l products in all, then 2 s^3 FLOPs a product: fewer for l > 1.5 s."""
    gram = x @ x.mT  # (n, s, s)
    q = None
    for i, (a, b, c) in enumerate(coefficients):
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # bG + cG^2, (n, s, s)
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # P = aI + bG + cG^2
        q = poly if q is None else poly @ q  # (n, s, s)
        if i < len(coefficients) - 1:
            gram = poly @ (gram @ poly)  # G <- PGP, symmetric as G is
    return q @ x  # (n, s, l)


@dataclasses.dataclass(frozen=True)
class Precision:
    """How Newton-Schulz runs on a device: its dtype, the CPU threads its products are kept to
    (None: the run's), and why, for the start line."""

    dtype: torch.dtype
    threads: int | None
    why: str

    @property
    def words(self) -> str:
        name = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(self.dtype, str(self.dtype))
        on = f" on {plural(self.threads)}" if self.threads else ""
        return f"{name}{on}, {self.why}"


def newton_schulz_precision(device: torch.device, environ=os.environ) -> Precision:
    """bf16 where bf16 matrix units make it fast: CUDA from sm_80, a CPU with AMX or AVX-512
    BF16 that oneDNN may use (ONEDNN_MAX_CPU_ISA can forbid them); fp32 elsewhere. On the CPU,
    bf16 products go through oneDNN, whose results may change with the thread count (MKL's
    reproducible mode covers fp32 only): they are kept to one thread, so that a run's results
    never depend on how many it has."""
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return Precision(torch.bfloat16, None, "bf16 tensor cores")
        return Precision(torch.float32, None, "this GPU has no bf16 tensor cores")
    if device.type == "cpu":
        units, missing = cpu_bf16_units(environ)
        if units is not None:
            return Precision(torch.bfloat16, 1,
                             f"{units}; one thread for the same results at any count")
        return Precision(torch.float32, None, missing)
    return Precision(torch.float32, None, f"bf16 is not known to be fast on {device.type}")


def newton_schulz_flops(shapes: Sequence[torch.Size], steps: int, dtype: torch.dtype) -> int:
    """FLOPs of orthogonalizing one matrix of each of `shapes` with `steps` iterations in
    `dtype` (the form `orthogonalize` takes for it)."""
    total = 0
    for rows, cols in shapes:
        s, l = sorted((rows, cols))
        if dtype != torch.bfloat16 and steps > 1 and l > GRAM_ASPECT * s:
            total += 4 * s * s * l + 2 * (4 * steps - 3) * s**3
        else:
            total += steps * (4 * s * s * l + 2 * s**3)
    return total


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: per parameter a momentum buffer m <- lerp(m, g, 1 - momentum);
    the update g + momentum (m - g) (Nesterov) or m, orthogonalized (`orthogonalize` with
    `coefficients`, in `precision`); decoupled weight decay p <- p (1 - lr wd); then
    p <- p - lr sqrt(max(1, rows / cols)) update, which gives every shape the same update size
    per entry. torch.optim.Muon's settings and state layout, with Keller Jordan's learning rate,
    0.02, for default; Polar Express's five polynomials where torch's repeats Jordan's one."""

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 coefficients: Sequence[tuple[float, float, float]] | None = None,
                 precision: Precision | None = None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes matrices only, got a {tuple(p.shape)} tensor")
        self.coefficients = tuple(coefficients or polar_express(5))
        self.precision = precision or Precision(torch.float32, None, "asked for")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            momentum, lr = group["momentum"], group["lr"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            for shape in dict.fromkeys(p.shape for p in params):  # one batched product a shape
                same = [i for i, p in enumerate(params) if p.shape == shape]
                stack = torch.stack([updates[i] for i in same])  # (n, rows, cols)
                with count_kept():
                    if self.precision.threads is not None:
                        torch.set_num_threads(self.precision.threads)
                    ortho = orthogonalize(stack, self.coefficients, self.precision.dtype)
                torch._foreach_add_([params[i] for i in same],
                                    list(ortho.to(params[same[0]].dtype).unbind(0)),
                                    alpha=-lr * max(1.0, shape[0] / shape[1]) ** 0.5)
        return loss


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weight matrices inside the transformer blocks: attention's qkv and output projections
    and the MLP's two layers; the bigram model has none."""
    return [p for name, p in model.named_parameters()
            if name.startswith("blocks.") and p.dim() == 2 and p.requires_grad]


class Optimizers:
    """A run's optimizers, stepped as one: `parts` maps a name ("adamw", "muon") to its
    optimizer, in the order they step; checkpoints keep each part's state under its name.
    `scales`: each part's peak learning rate over AdamW's (1 for AdamW itself)."""

    def __init__(self, parts: dict[str, torch.optim.Optimizer], scales: dict[str, float],
                 cfg: TrainConfig):
        self.parts, self.scales, self.cfg = parts, scales, cfg

    def schedule(self, it: int) -> None:
        """Set every group's learning rate for step `it`: the one schedule (`lr_at`) times its
        optimizer's scale."""
        rate = lr_at(it, self.cfg)
        for name, optimizer in self.parts.items():
            for group in optimizer.param_groups:
                group["lr"] = rate * self.scales[name]

    def unscale(self, scaler: torch.amp.GradScaler) -> None:
        for optimizer in self.parts.values():
            scaler.unscale_(optimizer)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Step every part (through `scaler`, which skips a step whose gradients overflowed)."""
        for optimizer in self.parts.values():
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.parts.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, dict]:
        return {name: optimizer.state_dict() for name, optimizer in self.parts.items()}

    def load_state(self, saved: dict[str, dict]) -> None:
        """Load a checked checkpoint's per-parameter state into every part. The groups' settings
        stay this run's, from its config: a resumed run's new --weight-decay or --beta2 takes
        effect, and nothing else in the checkpoint reaches them."""
        for name, optimizer in self.parts.items():
            groups = optimizer.state_dict()["param_groups"]
            optimizer.load_state_dict({"state": saved[name]["state"], "param_groups": groups})


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   device: torch.device) -> Optimizers:
    """AdamW on every parameter, or (cfg.optimizer "muon") Muon on `hidden_matrices` and AdamW
    on the rest. Weight decay on matrices and embeddings only, never on gains and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    muon = hidden_matrices(model) if cfg.optimizer == "muon" else []
    taken = {id(p) for p in muon}
    rest = [p for p in params if id(p) not in taken]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    parts = {"adamw": torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                        fused=fused, foreach=None if fused else True)}
    scales = {"adamw": 1.0}
    if muon:
        parts["muon"] = Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                             coefficients=polar_express(cfg.muon_ns_steps),
                             precision=newton_schulz_precision(device))
        scales["muon"] = cfg.muon_lr / cfg.lr
    return Optimizers(parts, scales, cfg)


def expected_state(part: str, param: torch.Tensor) -> dict[str, tuple[torch.Size, bool]]:
    """What optimizer `part` keeps for `param`: each tensor's shape, and whether it may be
    negative. Checkpoints are checked against this before their optimizer state is loaded."""
    if part == "muon":
        return {"momentum_buffer": (param.shape, True)}
    return {"step": (torch.Size([]), False), "exp_avg": (param.shape, True),
            "exp_avg_sq": (param.shape, False)}


def describe(optimizers: Optimizers, model: torch.nn.Module, tokens: int) -> str:
    """The run's optimizers and peak rates, for the start line; for Muon, how its Newton-Schulz
    runs here and its FLOPs beside the forward and backward pass of `model` over `tokens`."""
    cfg = optimizers.cfg
    adamw = f"adamw lr {cfg.lr:g}"
    muon = optimizers.parts.get("muon")
    if muon is None:
        return adamw
    shapes = [p.shape for group in muon.param_groups for p in group["params"]]
    steps = len(muon.coefficients)
    share = (newton_schulz_flops(shapes, steps, muon.precision.dtype)
             / (tokens * model.flops_per_token()))
    costly = "; fewer with --muon-ns-steps, or --optimizer adamw" if share >= 1 else ""
    return (f"muon lr {cfg.muon_lr:g} (Newton-Schulz: {steps} iteration{'s' * (steps > 1)} in "
            f"{muon.precision.words}; {share:.2f}x the model's FLOPs a step{costly}) + {adamw}")


def lower_rates(cfg: TrainConfig) -> str:
    """What to lower when training with `cfg` diverges."""
    lower = f"--lr below {cfg.lr:g}"
    if cfg.optimizer == "muon":
        lower += f" or --muon-lr below {cfg.muon_lr:g}"
    return lower
