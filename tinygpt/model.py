"""The models: a bigram baseline and a pre-norm, decoder-only GPT.

Attention and LayerNorm go through `tinygpt.ops`, the single dispatch point, with the concrete
backend name (`reference`, `torch` or `triton`) the model was built with.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import ModelConfig


class LanguageModel(nn.Module):
    """What training and sampling need from a model: logits, and the loss when targets are given."""

    config: ModelConfig

    def loss(self, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        if targets is None:
            return None
        # (B, T, V) -> (B*T, V) against (B, T) -> (B*T,)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class BigramLanguageModel(LanguageModel):
    """Each character's logits for the next one come straight from a (V, V) lookup table."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.table(idx)  # (B, T, V)
        return logits, self.loss(logits, targets)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's `bias=False`), run by the chosen backend,
    after adding a branch's output to the residual stream (see `forward`)."""

    def __init__(self, n: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(LayerNorm(h), h) with the residual stream h = x + residual (h = x without one)."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, backend)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, backend: str, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        qkv = self.qkv(x).view(B, T, 3, H, D)  # (B, T, 3, H, D)
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = ops.attention_qkv(qkv, dropout_p=p, backend=backend)  # (B, H, T, D)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, D), strided views
            causal = cache.length == 0  # prefill is causal; a decode step sees the whole cache
            k, v = cache.append(layer, k, v)  # 2 x (B, H, S, D), S = cached + T
            y = ops.attention(q, k, v, dropout_p=p, backend=backend, causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)).

    Each residual add is done by the LayerNorm that follows it, so a block takes the residual
    stream and the previous branch's output not yet added to it, and returns the same pair.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, branch: torch.Tensor, residual: torch.Tensor | None, backend: str,
                cache: KVCache | None = None, layer: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual stream before it); both (B, T, C). `residual` is None in the
        first block, whose `branch` is the embeddings."""
        x, residual = self.ln1(branch, residual, backend)
        x, residual = self.ln2(self.attn(x, backend, cache, layer), residual, backend)
        return self.mlp(x), residual


class GPT(LanguageModel):
    """Token + position embeddings, `n_layer` pre-norm blocks, a final LayerNorm, and a head
    whose weight is shared with the token embedding."""

    def __init__(self, config: ModelConfig, backend: str = "torch"):
        super().__init__()
        self.config = config
        self.backend = backend
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight, plus causal attention's
        score and value matmuls at full context (the PaLM appendix estimate nanoGPT also uses)."""
        c = self.config
        weights = self.num_params() - self.pos_emb.weight.numel()
        return 6 * weights + 12 * c.n_layer * c.n_embd * c.block_size

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None):
        """Logits for idx (B, T); with `cache`, idx continues the cached positions."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start and T != 1:
            raise ValueError("after the prefill, a cached forward takes one token at a time")
        if start + T > self.config.block_size:
            raise ValueError(
                f"positions up to {start + T} exceed block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        branch = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        residual = None
        for layer, block in enumerate(self.blocks):
            branch, residual = block(branch, residual, self.backend, cache, layer)
        if cache is not None:
            cache.length += T
        x, _ = self.ln_f(branch, residual, self.backend)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        return logits, self.loss(logits, targets)


class KVCache:
    """Keys and values of every layer for the positions seen so far, for incremental decoding.

    Buffers are (B, H, block_size, D) per layer, allocated on first use in the keys' dtype.
    Positions are absolute: a full cache cannot take another token (see `generate`).
    """

    def __init__(self, config: ModelConfig):
        self.block_size = config.block_size
        self.keys: list[torch.Tensor | None] = [None] * config.n_layer
        self.values: list[torch.Tensor | None] = [None] * config.n_layer
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, D) after the cached positions; return all of them (B, H, S, D)."""
        B, H, T, D = k.shape
        if self.keys[layer] is None:
            self.keys[layer] = k.new_empty((B, H, self.block_size, D))
            self.values[layer] = v.new_empty((B, H, self.block_size, D))
        end = self.length + T
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0


def attention_shape(config: ModelConfig, batch_size: int) -> ops.AttentionShape | None:
    """The attention a batch of `batch_size` sequences runs through (None: the model has none)."""
    if config.model == "bigram":
        return None
    return ops.AttentionShape(batch_size, config.n_head, config.n_embd // config.n_head)


def build_model(config: ModelConfig, backend: str = "torch") -> LanguageModel:
    if config.model == "bigram":
        return BigramLanguageModel(config)
    return GPT(config, backend)
