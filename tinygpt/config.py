"""Model and training configuration: two dataclasses and the named presets.

Every field carries a help string; the command line builds one `--flag` per field from them, so
a preset is only a set of defaults and any field can be overridden (`--n-layer 4`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import UserError


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _check_finite(config) -> None:
    """Every float field a finite number: nan and inf pass most range checks unnoticed."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{f.name} must be a finite number, got {value}")


@dataclass
class ModelConfig:
    model: str = _f("gpt", "architecture", choices=("gpt", "bigram"))
    vocab_size: int = _f(65, "number of distinct characters (set from the corpus)", cli=False)
    block_size: int = _f(256, "context length in characters")
    n_layer: int = _f(6, "transformer blocks")
    n_head: int = _f(6, "attention heads per block")
    n_embd: int = _f(384, "embedding width (divisible by n_head)")
    dropout: float = _f(0.2, "dropout on attention weights, residual branches and embeddings")
    bias: bool = _f(False, "biases in Linear and LayerNorm layers")

    def validate(self) -> None:
        _check_finite(self)
        if self.block_size < 1:
            raise UserError(f"block_size must be at least 1, got {self.block_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.model == "gpt":
            if self.n_layer < 1 or self.n_head < 1 or self.n_embd < 1:
                raise UserError("n_layer, n_head and n_embd must be at least 1")
            if self.n_embd % self.n_head:
                raise UserError(
                    f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
                )


@dataclass
class TrainConfig:
    batch_size: int = _f(64, "sequences per micro-batch (global batch: batch_size x grad_accum)")
    grad_accum: int = _f(1, "micro-batches per optimizer step, shared out among torchrun "
                            "processes, so the global batch stays fixed as their number changes")
    max_iters: int = _f(5000, "optimizer steps in total")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = _f(100, "linear warm-up steps")
    lr_decay_iters: int = _f(5000, "step at which the cosine decay reaches min_lr")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.99, "AdamW beta2")
    weight_decay: float = _f(0.1, "AdamW weight decay, applied to 2-D weights only")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0 disables)")
    eval_interval: int = _f(250, "evaluate train/val loss every this many steps")
    eval_iters: int = _f(200, "batches per split in each evaluation")
    seed: int = _f(1337, "random seed for weights, batches and dropout")
    device: str = _f("auto", "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    backend: str = _f(
        "auto", "attention/LayerNorm implementation",
        choices=("auto", "triton", "torch", "reference"),
    )
    compile: bool = _f(False, "wrap the model in torch.compile")
    out_dir: str = _f("out", "directory for checkpoints")

    def validate(self) -> None:
        _check_finite(self)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.grad_accum < 1:
            raise UserError(f"grad_accum must be at least 1, got {self.grad_accum}")
        if self.max_iters < 0:
            raise UserError(f"max_iters must be non-negative, got {self.max_iters}")
        if self.lr <= 0 or self.min_lr < 0:
            raise UserError(f"lr must be positive and min_lr non-negative, got lr={self.lr}, "
                            f"min_lr={self.min_lr}")
        if self.eval_interval < 1 or self.eval_iters < 1:
            raise UserError("eval_interval and eval_iters must be at least 1")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")


PRESETS: dict[str, dict] = {
    # nanoGPT's shakespeare-char recipe.
    "shakespeare-char": {},
    # nanoGPT's small CPU recipe.
    "cpu-baby": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0,
        batch_size=12, max_iters=2000, lr_decay_iters=2000, eval_iters=20,
    ),
    # The first model of the lesson: next character from the current one alone.
    "bigram": dict(
        model="bigram", block_size=8, dropout=0.0,
        batch_size=32, max_iters=3000, lr=1e-2, min_lr=1e-3, warmup_iters=0,
        lr_decay_iters=3000, weight_decay=0.0, eval_interval=300,
    ),
}


def fields_of(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def from_preset(name: str, **overrides) -> tuple[ModelConfig, TrainConfig]:
    """Both configs for a named preset, with `overrides` (any field of either) applied."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    model_names = {f.name for f in fields_of(ModelConfig)}
    train_names = {f.name for f in fields_of(TrainConfig)}
    unknown = set(values) - model_names - train_names
    if unknown:
        raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    model = ModelConfig(**{k: v for k, v in values.items() if k in model_names})
    train = TrainConfig(**{k: v for k, v in values.items() if k in train_names})
    model.validate()
    train.validate()
    return model, train
