"""Load: open a build's shared library and serve its kernels to PyTorch as ``torch.ops.apex4gen.*``.

Three layers, each in its own module:

* :mod:`.binding`: the C ABI (runtime/apex4gen.h) through ctypes: the argument struct, the signatures, status
  codes turned into exceptions; the enum values come from :mod:`apex4gen.abi`.
* :mod:`.ops`: the ``torch.library`` custom ops with fake implementations, run on the current CUDA stream, so they
  work under torch.compile and CUDA graphs (no host synchronisation, no allocation inside the library).
* :mod:`.api`: :func:`load` and the :class:`Build` a user holds (``pack``, ``linear``, ``gemm``, ``quantize_act``).

The runtime never imports the compiler (jinja2, emit, build, planner, costmodel): the manifest it reads is
:mod:`apex4gen.manifest`.
"""
from .api import Build, PackedWeight, load

__all__ = ["Build", "PackedWeight", "load"]
