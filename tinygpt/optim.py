"""The optimizer and its schedule: AdamW with linear warm-up and cosine decay."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, cosine decay to `min_lr` at `lr_decay_iters`, then flat."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW; weight decay on matrices (and embeddings) only, never on gains and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused,
                             foreach=None if fused else True)


def expected_state(param: torch.Tensor) -> dict[str, tuple[torch.Size, bool]]:
    """What AdamW keeps for `param`: each tensor's shape, and whether it may be negative.
    Checkpoints are checked against this before their optimizer state is loaded."""
    return {"step": (torch.Size([]), False), "exp_avg": (param.shape, True),
            "exp_avg_sq": (param.shape, False)}


def load_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a checked checkpoint's per-parameter state into `optimizer`. The parameter groups'
    settings stay the optimizer's own, from this run's config: a resumed run's new
    --weight-decay or --beta2 takes effect, and nothing else in the checkpoint reaches them."""
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})
