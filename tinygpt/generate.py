"""Sampling text from a trained model, with a key/value cache.

Cache modes (`cache=`):
  shift  (default) one prefill over the prompt, then one position per step. Positions are
         absolute, so when the context fills the block, the newest half is kept and re-prefilled
         once; the context then stays between block_size/2 and block_size characters, and the cost
         per character stays flat.
  exact  cached while the text fits in the block, then re-runs the last block_size characters
         every step: the same tokens as uncached generation, and no faster past block_size.
  off    no cache: every step re-runs the model over the last block_size characters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import ops
from .config import SampleConfig
from .model import GPT, KVCache, LanguageModel


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The distribution (B, V) that sampling draws the next token from: softmax(logits /
    temperature) over the top_k most likely tokens and the smallest set whose probability
    reaches top_p. `temperature` > 0; as it nears 0, all the mass goes to the largest logit."""
    logits = logits.float()
    # Dividing after the row's maximum is taken off keeps every value <= 0: a tiny temperature
    # sends the others to -inf, never to inf - inf. The floor keeps the divisor a float32 > 0.
    logits = logits - logits.amax(dim=-1, keepdim=True)  # (B, V)
    logits = logits / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # keeps the top 1
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """One token per row from logits (B, V) -> (B, 1): drawn from `next_token_probs`, or the
    most likely one when temperature is 0."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(next_token_probs(logits, temperature, top_k, top_p), 1,
                             generator=generator)


@torch.no_grad()
def generate(model: LanguageModel, idx: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, cache: str = "shift",
             on_token: Callable[[torch.Tensor], None] | None = None, amp: bool = True
             ) -> torch.Tensor:
    """Extend idx (B, T) by `max_new_tokens` sampled tokens; `on_token` sees each new (B, 1).

    With `amp`, the model runs under the autocast training uses on idx's device (bf16 on CUDA);
    amp=False keeps the parameters' dtype throughout."""
    SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, cache=cache).validate()
    block = model.config.block_size
    kv = KVCache(model.config) if cache != "off" and isinstance(model, GPT) else None

    def logits_for(idx: torch.Tensor, new: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits (B, V) for the context idx; `new` is its last token, if cached."""
        if kv is None or (cache == "exact" and idx.size(1) > block):
            return model(idx[:, -block:])[0][:, -1]
        if new is not None and kv.length < block:
            return model(new, cache=kv)[0][:, -1]  # one cached step
        kv.reset()  # prefill: the prompt, or the newest half of a full context
        keep = block if new is None else block // 2
        return model(idx[:, -keep:], cache=kv)[0][:, -1]

    if max_new_tokens == 0:
        return idx
    amp_dtype = ops.precision(idx.device)[0] if amp else None
    with torch.autocast(idx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = logits_for(idx, None)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)  # (B, T+1)
            if on_token is not None:
                on_token(nxt)
            if i + 1 < max_new_tokens:
                logits = logits_for(idx, nxt)
    return idx
