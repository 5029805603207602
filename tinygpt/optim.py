"""The optimizers and their schedule: AdamW for every parameter, or Muon for the blocks' weight
matrices with AdamW for the rest; one warm-up and cosine decay drives both.

Muon (Keller Jordan, 2024) moves a weight matrix along its Nesterov momentum made orthogonal.
Five steps of the Newton-Schulz iteration X <- aX + b(XX^T)X + c(XX^T)^2 X, from the momentum
scaled to unit Frobenius norm, take every singular value to about 1 whatever it was, so that a
step changes the matrix by as much in its rarely used directions as in its dominant ones. The
math and the default coefficients are torch.optim.Muon's, and the tests hold this one to it; this
one orthogonalizes all matrices of a shape at once, in one batched product (bf16, as torch's),
where torch's takes them one by one. Embeddings, the tied head and LayerNorm gains are not hidden
matrices: Muon's uniform step does not suit them, and AdamW keeps them.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # a, b, c: steep at 0, so few iterations suffice
NS_STEPS = 5
NS_EPS = 1e-7


def lr_at(it: int, cfg: TrainConfig) -> float:
    """AdamW's rate: linear warm-up to `lr`, cosine decay to `min_lr` at `lr_decay_iters`, then
    flat. Muon's is this times muon_lr / lr."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def orthogonalize(m: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Newton-Schulz on a stack of matrices (n, rows, cols), in bf16: each comes back with the
    same singular vectors and singular values of about 1 (about 0.7 to 1.2 after 5 steps)."""
    a, b, c = NS_COEFFICIENTS
    tall = m.size(-2) > m.size(-1)
    x = m.bfloat16()
    if tall:
        x = x.mT  # (n, s, l) with s <= l, so that the Gram matrices are the small s x s ones
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(NS_EPS)  # every singular value <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (n, s, s)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2, (n, s, s)
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X, (n, s, l)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: per parameter a momentum buffer m <- lerp(m, g, 1 - momentum);
    the update g + momentum (m - g) (Nesterov) or m, orthogonalized; decoupled weight decay
    p <- p (1 - lr wd); then p <- p - lr sqrt(max(1, rows / cols)) update, which gives every
    shape the same update size per entry. torch.optim.Muon's settings and state layout, with
    Keller Jordan's learning rate, 0.02, for default."""

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = NS_STEPS):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes matrices only, got a {tuple(p.shape)} tensor")

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
                ortho = orthogonalize(stack, group["ns_steps"]).to(params[same[0]].dtype)
                torch._foreach_add_([params[i] for i in same], list(ortho.unbind(0)),
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
        parts["muon"] = Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
        scales["muon"] = cfg.muon_lr / cfg.lr
    return Optimizers(parts, scales, cfg)


def expected_state(part: str, param: torch.Tensor) -> dict[str, tuple[torch.Size, bool]]:
    """What optimizer `part` keeps for `param`: each tensor's shape, and whether it may be
    negative. Checkpoints are checked against this before their optimizer state is loaded."""
    if part == "muon":
        return {"momentum_buffer": (param.shape, True)}
    return {"step": (torch.Size([]), False), "exp_avg": (param.shape, True),
            "exp_avg_sq": (param.shape, False)}


def lower_rates(cfg: TrainConfig) -> str:
    """What to lower when training with `cfg` diverges."""
    lower = f"--lr below {cfg.lr:g}"
    if cfg.optimizer == "muon":
        lower += f" or --muon-lr below {cfg.muon_lr:g}"
    return lower
