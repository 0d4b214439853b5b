"""apex4gen: generates W4A4 GEMM kernels (4-bit weights, 4-bit activations) for LLM inference."""
__version__ = "0.1.0"

from . import reference  # noqa: E402  (public numerics API)


def load(build_dir):
    """Load a build made by ``apex4gen build`` (see :func:`apex4gen.loader.load`)."""
    from .loader import load as _load
    return _load(build_dir)


__all__ = ["__version__", "load", "reference"]
