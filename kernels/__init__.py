"""tinygpt.kernels: fused Triton kernels and their pure-PyTorch references.

`reference` needs only torch. Without a usable Triton (macOS, Windows, broken installs) this
package still imports; the Triton ops then raise ImportError saying why, and
`TRITON_IMPORT_ERROR` holds the reason.
"""

from .reference import attention_reference, layer_norm_reference

TRITON_IMPORT_ERROR: str | None = None
try:
    from .attention import attention, attention_dropout_mask, attention_qkv, unsupported_shape
    from .layernorm import add_layer_norm, layer_norm
except ImportError as e:
    TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"

    def _unavailable(*args, **kwargs):
        raise ImportError(f"the Triton kernels are unavailable ({TRITON_IMPORT_ERROR})")

    attention = attention_dropout_mask = attention_qkv = layer_norm = add_layer_norm = _unavailable
    unsupported_shape = _unavailable

__all__ = ["attention", "attention_dropout_mask", "attention_qkv", "layer_norm", "add_layer_norm",
           "unsupported_shape", "attention_reference", "layer_norm_reference",
           "TRITON_IMPORT_ERROR"]
