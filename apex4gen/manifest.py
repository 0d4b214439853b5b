"""A build's manifest (``manifest.json``): the frozen record the build writes last and the loader reads.

It names the library, the kernels (index, config, activation format, weight layout), the routes (problem + M
bucket -> kernel, as dispatch.cu has them) and every compile command. Standard library only: the build and the
runtime both use it, and the runtime must not import the compiler.

Lifecycle: a rebuild first sets the old manifest aside (a failed build must not look loadable), and
:func:`settle` puts the new one in place after a successful link; an unchanged manifest goes back as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import LoadError
from .files import write_if_different

NAME = "manifest.json"
ASIDE = ".manifest.json.previous"  # a rebuild's old manifest until it succeeds


@dataclass(frozen=True)
class Route:
    """Problem (N, K, group, dtype, activation bits) and M bucket -> kernel index, as dispatch.cu and the loader
    read it."""

    n: int
    k: int
    group: int          # the group size the ABI receives: K for per-channel
    dtype: str
    m_max: int
    kernel: int
    act_bits: int = 4   # the plan's activation precision for the problem's layers


@dataclass(frozen=True)
class KernelEntry:
    """One compiled kernel: ``index`` is its number in the C ABI (apex4gen_run_kernel)."""

    index: int
    name: str
    config: dict        # KernelConfig.to_dict()
    act_format: str     # a key of apex4gen.abi.ACT_FORMAT
    act_bits: int       # activation precision the kernel reads (4 or 8): what quantize_act is asked for
    weight_layout: str  # a layout of apex4gen.kernels.layouts
    source: str         # relative to the build directory


@dataclass(frozen=True)
class CompileCommand:
    source: str         # relative to the build directory, as ninja runs there
    object: str
    command: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    apex4gen: str       # versions of the compiler and toolchain that made the build
    cutlass: str
    nvcc: str
    gpu: str
    arch: str           # e.g. sm_86, sm_90a
    sm: int             # what apex4gen_build_arch() returns
    ptx_embedded: bool
    model: str
    out_dtype: str
    plan_sha256: str    # of the plan.yaml beside it
    prefix: str         # of every exported symbol: apex4gen_<prefix>_<name> (apex4gen/library.py)
    abi_version: int    # APEX4GEN_ABI_VERSION of the header the build was made with
    library: str        # the shared library (its unversioned link), relative to the build directory
    static_library: str
    header: str         # include/apex4gen_<prefix>.h
    kernels: tuple[KernelEntry, ...]
    routes: tuple[Route, ...]
    compile: tuple[CompileCommand, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        """Raises TypeError or ValueError on a field that is missing, unknown or of the wrong shape."""
        _check_fields(cls, data)
        return cls(**{**data,
                      "kernels": tuple(_record(KernelEntry, k) for k in data["kernels"]),
                      "routes": tuple(_record(Route, r) for r in data["routes"]),
                      "compile": tuple(_record(CompileCommand, {**c, "command": tuple(c["command"])})
                                       for c in data["compile"])})


def _check_fields(cls, data) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"a {cls.__name__} entry is {type(data).__name__}, not an object")
    names = {f.name for f in fields(cls)}
    if set(data) != names:
        wrong = sorted(set(data) ^ names)
        raise ValueError(f"{cls.__name__} fields differ in {', '.join(wrong)}")


def _record(cls, data):
    _check_fields(cls, data)
    return cls(**data)


def plan_sha256(plan_yaml: str) -> str:
    """What ``plan_sha256`` holds: the hash of the plan file's text."""
    return hashlib.sha256(plan_yaml.encode()).hexdigest()


# what a manifest must hold before the loader looks further
_REQUIRED = ("arch", "gpu", "kernels", "library", "plan_sha256", "prefix", "ptx_embedded", "routes", "sm")


_PLAN_GPU = re.compile(r"^gpu: *['\"]?([^\s'\"#]+)", re.M)


def rebuild_command(build_dir: Path) -> str:
    """The command that rebuilds ``build_dir`` from its plan: ``apex4gen build`` needs --gpu even with --plan, and
    the plan file names its GPU (``GPU`` where the plan cannot be read)."""
    try:
        text = (build_dir / "plan.yaml").read_text()
    except (OSError, UnicodeDecodeError):
        text = ""
    # the plan's top-level `gpu:` line, read without a YAML parser (the runtime side imports only the stdlib)
    found = _PLAN_GPU.search(text)
    gpu = found.group(1) if found else "GPU"
    return f"apex4gen build --gpu {gpu} --plan {build_dir / 'plan.yaml'} --out {build_dir}"


def read(build_dir: Path) -> Manifest:
    """The manifest, checked to be whole and to describe the plan.yaml beside it (a build that stopped between
    writing a new plan and linking leaves them apart). Every refusal is one line naming the rebuild command."""
    path = build_dir / NAME
    rebuild = f"rebuild it with `{rebuild_command(build_dir)}`"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LoadError(f"{path} is unreadable ({err}); {rebuild}") from None
    missing = [key for key in _REQUIRED if not isinstance(data, dict) or key not in data]
    if missing:
        raise LoadError(f"{path} lacks {', '.join(missing)}; {rebuild}")
    plan_path = build_dir / "plan.yaml"
    if not plan_path.is_file() or plan_sha256(plan_path.read_text()) != data["plan_sha256"]:
        raise LoadError(f"{build_dir}'s library was not built from the plan.yaml beside it; {rebuild}")
    try:
        return Manifest.from_dict(data)
    except (TypeError, ValueError, KeyError) as err:
        raise LoadError(f"{path} is malformed ({err}); {rebuild}") from None


def set_aside(build_dir: Path) -> None:
    """A build that fails must not look loadable: its manifest waits aside until the build succeeds."""
    if (build_dir / NAME).exists():
        os.replace(build_dir / NAME, build_dir / ASIDE)


def restore(build_dir: Path) -> None:
    """The manifest set aside goes back unchanged (the library it describes still matches the sources)."""
    if (build_dir / ASIDE).exists():
        os.replace(build_dir / ASIDE, build_dir / NAME)


def settle(build_dir: Path, manifest: Manifest) -> Path:
    """The new manifest in place; an unchanged one goes back as it was (no-op builds keep its mtime)."""
    text = manifest.to_json()
    aside = build_dir / ASIDE
    if aside.exists() and aside.read_text() == text:
        os.replace(aside, build_dir / NAME)
    else:
        write_if_different(build_dir / NAME, text)
        aside.unlink(missing_ok=True)
    return build_dir / NAME
