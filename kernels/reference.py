"""Pure-PyTorch reference math for every op in tinygpt.

This file is the source of truth: each fused Triton kernel is tested against these functions, and
the model's `reference` backend runs them directly. They favour the explicit textbook formula over
speed. `upcast` (e.g. ``torch.float64``) computes, and returns, in a wider dtype than the input's,
which is how tests obtain a near-exact answer to measure low-precision errors against.
"""

from __future__ import annotations

import math

import torch


def _cast(t: torch.Tensor | None, upcast: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or upcast is None else t.to(upcast)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    upcast: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension from its mean and biased variance.

    y = (x - mean) / sqrt(var + eps) * weight + bias, with `weight`/`bias` optional.
    """
    x, weight, bias = _cast(x, upcast), _cast(weight, upcast), _cast(bias, upcast)
    mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # (..., 1)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: torch.dtype | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention written out step by step.

    q: (B, H, T, D), k and v: (B, H, S, D). With `causal`, query i sees keys j <= i (queries
    and keys aligned at the start, T == S in a GPT). Dropout acts on the attention weights:
    `dropout_mask` (bool, (B, H, T, S), True = keep) fixes which weights survive, otherwise a
    fresh mask is drawn from torch's generator. Kept weights are scaled by 1 / (1 - dropout_p).
    """
    q, k, v = _cast(q, upcast), _cast(k, upcast), _cast(v, upcast)
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if causal:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # (T, S)
        scores = scores.masked_fill(~visible, -math.inf)
    weights = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    if dropout_mask is not None:
        weights = weights * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout_p)
    return weights @ v  # (B, H, T, D)
