"""tinygpt: a small character-level GPT with fused Triton kernels and pure-PyTorch fallbacks."""

__version__ = "0.1.0"
