"""apex4gen: generates W4A4 GEMM kernels (4-bit weights, 4-bit activations) for LLM inference."""
__version__ = "0.1.0"

from . import reference  # noqa: E402  (public numerics API)

__all__ = ["__version__", "reference"]
