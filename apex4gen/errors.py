"""Errors a user can act on. The CLI prints ``str(err)`` as one line and exits non-zero; no traceback."""
from __future__ import annotations


class Apex4genError(Exception):
    """Base: the message names what is wrong and how to fix it."""

    exit_code = 2


class SpecError(Apex4genError):
    """A GPU/model/workload/plan spec is missing, unknown, malformed or impossible."""


class ShapeError(Apex4genError):
    """A GEMM shape or configuration that a kernel cannot take."""


class ToolchainError(Apex4genError):
    """nvcc, ninja or the CUTLASS headers are missing or unusable."""


class BuildError(Apex4genError):
    """A generated kernel failed to compile or link."""


class LoadError(Apex4genError):
    """A build cannot be loaded here (wrong GPU architecture, missing files, no CUDA)."""
