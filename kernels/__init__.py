"""tinygpt.kernels: fused Triton kernels and their pure-PyTorch references.

`reference` needs only torch. The Triton ops import triton on first use, so this package also
imports on machines without it (macOS, Windows, CPU-only installs).
"""

import importlib

_LAZY = {
    "layer_norm": "layernorm",
    "attention": "attention",
    "attention_dropout_mask": "attention",
}

__all__ = ["layer_norm", "attention", "attention_dropout_mask"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
