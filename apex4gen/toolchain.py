"""The toolchain a build needs: nvcc, ninja and the CUTLASS headers of the nvidia-cutlass wheel.

Each lookup fails with one line that says what is missing and how to get it.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from .errors import ToolchainError
from .kernels.cpp_names import GENCODE


@functools.lru_cache(maxsize=1)
def cutlass_root() -> Path:
    """``cutlass_library/source`` of the nvidia-cutlass wheel (include/ and tools/util/include/)."""
    override = os.environ.get("APEX4GEN_CUTLASS_DIR")
    if override:
        root = Path(override)
    else:
        try:
            import cutlass_library
        except ImportError:
            raise ToolchainError("the CUTLASS headers are missing: pip install nvidia-cutlass "
                                 "(or set APEX4GEN_CUTLASS_DIR to a CUTLASS source tree)") from None
        root = Path(cutlass_library.__file__).resolve().parent / "source"
    if not (root / "include" / "cutlass" / "cutlass.h").is_file():
        raise ToolchainError(f"no CUTLASS headers under {root}/include: reinstall nvidia-cutlass "
                             "or point APEX4GEN_CUTLASS_DIR at a CUTLASS checkout")
    return root


def cutlass_include_dirs() -> list[Path]:
    root = cutlass_root()
    return [root / "include", root / "tools" / "util" / "include"]


@functools.lru_cache(maxsize=1)
def cutlass_version() -> str:
    text = (cutlass_root() / "include" / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)


@functools.lru_cache(maxsize=1)
def nvcc_path() -> str:
    found = os.environ.get("APEX4GEN_NVCC") or shutil.which("nvcc")
    if not found:
        cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
        candidate = Path(cuda_home) / "bin" / "nvcc"
        found = str(candidate) if candidate.is_file() else None
    if not found or not os.access(found, os.X_OK):
        where = f" at {found}" if found else ""
        raise ToolchainError(f"nvcc not found{where}: install the CUDA toolkit (12.4 or newer) and put nvcc on "
                             "PATH, or set APEX4GEN_NVCC; `apex4gen build --emit-only` renders without it")
    return found


@functools.lru_cache(maxsize=1)
def nvcc_version() -> str:
    try:
        out = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise ToolchainError(f"{nvcc_path()} --version failed ({err}); check the CUDA installation") from None
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


@functools.lru_cache(maxsize=1)
def ninja_path() -> str:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja
        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        raise ToolchainError("ninja not found: pip install ninja") from None


def gencode_flags(arch: str, embed_ptx: bool = True) -> list[str]:
    """SASS for the arch, plus its PTX so newer GPUs can JIT it (how sm_80 builds are checked on an H100)."""
    virtual, real = GENCODE[arch]
    flags = [f"-gencode=arch={virtual},code={real}"]
    if embed_ptx:
        flags.append(f"-gencode=arch={virtual},code={virtual}")
    return flags


def nvcc_flags(arch: str, include_dirs: list[Path]) -> list[str]:
    """Every flag of a kernel compile; part of the build cache key. No -lineinfo: device line tables hold the
    absolute paths of the build folder and the CUTLASS headers, and a build's library is exported to other
    machines (NVCC_APPEND_FLAGS=-lineinfo adds it back for profiling source lines)."""
    return [
        "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler=-fPIC",
        "-Xcompiler=-fvisibility=hidden",
        *gencode_flags(arch, embed_ptx=not arch.endswith("a")),
        *[f"-I{d}" for d in include_dirs],
    ]
