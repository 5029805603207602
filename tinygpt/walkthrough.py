"""Self-attention in four steps, as the "Let's build GPT" lesson teaches it.

Every token should see a summary of the tokens before it, and only those. Start with the plainest
summary, an average of the past, and refine it:

1. `average_with_loop`: for each position t, average x[0..t] with an explicit loop.
2. `average_with_matmul`: the same numbers from one matrix product with a lower-triangular
   matrix whose rows sum to one (row t holds 1/(t+1) in its first t+1 entries).
3. `average_with_softmax`: the same matrix built as softmax over scores of zero with the future
   masked to -inf. Zero scores give uniform weights; learned scores will give any weights.
4. `single_head`: the scores become data-dependent. Each token emits a query ("what I look for")
   and a key ("what I contain"); score = q . k / sqrt(head_size); the tokens exchange values.
   This is one head of the attention that `tinygpt.model.CausalSelfAttention` runs with several
   heads at once, through `tinygpt.ops.attention`.

Run `python -m tinygpt.walkthrough` to see the three averages agree and one head at work.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def average_with_loop(x: torch.Tensor) -> torch.Tensor:
    """x: (B, T, C) -> (B, T, C), out[b, t] = mean(x[b, :t+1])."""
    B, T, C = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            out[b, t] = x[b, : t + 1].mean(dim=0)  # (C,)
    return out


def average_with_matmul(x: torch.Tensor) -> torch.Tensor:
    """The loop as a product with a row-normalised lower-triangular matrix."""
    T = x.shape[1]
    weights = torch.tril(torch.ones(T, T, dtype=x.dtype, device=x.device))  # (T, T)
    weights = weights / weights.sum(dim=1, keepdim=True)
    return weights @ x  # (T, T) @ (B, T, C) -> (B, T, C)


def average_with_softmax(x: torch.Tensor) -> torch.Tensor:
    """Uniform weights over the past as softmax of zero scores with the future set to -inf."""
    T = x.shape[1]
    tril = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))  # (T, T)
    scores = torch.zeros(T, T, dtype=x.dtype, device=x.device).masked_fill(~tril, float("-inf"))
    return F.softmax(scores, dim=-1) @ x  # (B, T, C)


class Head(nn.Module):
    """One head of causal self-attention with learned query, key and value projections."""

    def __init__(self, n_embd: int, head_size: int):
        super().__init__()
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        q, k, v = self.query(x), self.key(x), self.value(x)  # 3 x (B, T, hs)
        scores = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, T)
        tril = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
        scores = scores.masked_fill(~tril, float("-inf"))
        return F.softmax(scores, dim=-1) @ v  # (B, T, hs)


def single_head(x: torch.Tensor, head_size: int = 16, seed: int = 0) -> torch.Tensor:
    """x: (B, T, C) through a freshly initialised `Head` -> (B, T, head_size)."""
    torch.manual_seed(seed)
    return Head(x.shape[-1], head_size)(x)


def main() -> None:
    torch.manual_seed(1337)
    x = torch.randn(2, 8, 4)  # (B, T, C)
    loop, matmul, softmax = average_with_loop(x), average_with_matmul(x), average_with_softmax(x)
    print("x[0]:\n", x[0])
    print("average of the past, x[0]:\n", loop[0])
    print("loop == matmul:", torch.allclose(loop, matmul, atol=1e-6))
    print("loop == softmax:", torch.allclose(loop, softmax, atol=1e-6))
    out = single_head(torch.randn(2, 8, 32))
    print("one head: (2, 8, 32) ->", tuple(out.shape))


if __name__ == "__main__":
    main()
