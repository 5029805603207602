"""tinygpt.kernels: fused Triton kernels and their pure-PyTorch references.

`reference` needs only torch. The fused ops load on first use: registering them as
`torch.library` ops imports torch's compiler stack (seconds), which a run on the torch backend
never needs. Without a usable Triton (macOS, Windows, broken installs) the ops raise ImportError
saying why, and `TRITON_IMPORT_ERROR` holds the reason (None when Triton loaded).
"""

from .reference import attention_reference, layer_norm_reference

FUSED = ("attention", "attention_dropout_mask", "attention_qkv", "unsupported_shape",
         "layer_norm", "add_layer_norm")

__all__ = [*FUSED, "attention_reference", "layer_norm_reference", "TRITON_IMPORT_ERROR"]


def __getattr__(name: str):
    """The fused ops and TRITON_IMPORT_ERROR, loaded on first access (PEP 562)."""
    if name not in (*FUSED, "TRITON_IMPORT_ERROR"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from .flash_attention import (
            attention,
            attention_dropout_mask,
            attention_qkv,
            unsupported_shape,
        )
        from .layernorm import add_layer_norm, layer_norm
    except ImportError as e:
        error = f"{type(e).__name__}: {e}"

        def unavailable(*args, **kwargs):
            raise ImportError(f"the Triton kernels are unavailable ({error})")

        globals().update(dict.fromkeys(FUSED, unavailable), TRITON_IMPORT_ERROR=error)
    else:
        globals().update(attention=attention, attention_dropout_mask=attention_dropout_mask,
                         attention_qkv=attention_qkv, unsupported_shape=unsupported_shape,
                         layer_norm=layer_norm, add_layer_norm=add_layer_norm,
                         TRITON_IMPORT_ERROR=None)
    return globals()[name]
