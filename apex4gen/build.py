"""Build: render a plan's kernels into a build directory and compile them with ninja into one shared library.

Layout of a build directory (``generated/<gpu>-<model>/`` by default)::

    plan.yaml            the plan the build was made from
    src/*.cu             rendered kernels + dispatch.cu (generated; banner on every file)
    runtime/             hand-written runtime sources every build links (copied from the package)
    include/apex4gen.h   the C ABI header, for other engines, and apex4gen_<prefix>.h declaring this build's names
    build.ninja, obj/    the compile; object names carry the hash of source + command + toolchain
    lib/libapex4gen_<prefix>.so (and .a)  the product: C ABI (dispatch, kernels, activation quantization, weight
                         packing), every symbol prefixed per build (apex4gen/library.py)
    manifest.json        written last, only after a successful build: kernels, routes, files, flags (a rebuild
                         keeps the previous one aside as .manifest.json.previous until it succeeds)

This module orchestrates: check the plan, render (:mod:`apex4gen.emit`), name the compile units by their
object-cache key (:mod:`apex4gen.objcache`), compile and link with ninja (:mod:`apex4gen.ninjabuild`), then write
the manifest (:mod:`apex4gen.manifest`); :mod:`apex4gen.link` links the libraries. The PyTorch ops
(``torch.ops.apex4gen.*``) load the shared library through :mod:`apex4gen.loader`, so one binary serves PyTorch
and other engines alike.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import __version__
from . import manifest
from .plan import UNSERVED_FIX
from .emit import render_kernel, render_template, sha256_text
from .files import write_if_different
from .errors import Apex4genError, BuildError
from .kernels import KernelConfig, family_of
from .kernels import legality
from .kernels.cpp_names import ACT_FORMAT_ENUM, DTYPE_ENUM, SM_NUMBER, WEIGHT_LAYOUT_ENUM
from .library import LibraryFiles, abi_version, prefix_of
from .manifest import CompileCommand, KernelEntry, Manifest, Route
from .ninjabuild import CompileUnit, run_ninja, write_ninja
from .objcache import cache_key, object_path, remove_stale_objects
from .paths import runtime_dir
from . import toolchain

_LIBRARY_FILE = re.compile(r"libapex4gen.*\.(so|a)(\.[0-9.]+)?")
INT_MAX = 2**31 - 1
RUNTIME_SOURCES = ("quantize.cu", "fused_quantize.cu", "pack.cu")
# The C ABI and the headers the sources include (paths under runtime/); the object cache key hashes them all.
RUNTIME_HEADERS = ("apex4gen.h", "pack.cuh", "quantize.cuh",
                   *sorted(f"kernels/{p.name}" for p in (runtime_dir() / "kernels").glob("*.cuh")))


@dataclass(frozen=True)
class BuildResult:
    build_dir: Path
    library: Path | None  # the shared library (its unversioned link)
    kernels: tuple[str, ...]
    compiled: int        # compile units ninja ran this time (0 for a no-op rebuild)
    emitted_changed: int  # rendered files whose bytes changed


def routes_of(plan, kernels: list[KernelConfig]) -> list[Route]:
    index = {cfg: i for i, cfg in enumerate(kernels)}
    routes = []
    for gemm in plan.gemms:
        for bucket in gemm.buckets:
            if bucket.kernel is None:
                continue
            group = gemm.granularity.size(gemm.k)
            m_max = INT_MAX if bucket.m_max is None else int(bucket.m_max)
            routes.append(Route(gemm.n, gemm.k, group, gemm.out_dtype, m_max, index[bucket.kernel], gemm.act_bits))
    return sorted(routes, key=lambda r: (r.n, r.k, r.group, r.act_bits, r.dtype, r.m_max))


def check_plan_legal(plan, gpu) -> None:
    """A plan file may be hand-edited: every routed kernel is re-checked in the one legality module."""
    if plan.gpu != gpu.name:
        raise BuildError(f"the plan was made for {plan.gpu}, not {gpu.name}: build it with --gpu {plan.gpu}, or "
                         f"plan for {gpu.name} (apex4gen plan --gpu {gpu.name} ...)")
    for gemm in plan.gemms:
        for bucket in gemm.buckets:
            if bucket.kernel is not None:
                legality.check(bucket.kernel, gpu, gemm)


def _check_extra_legal(extra_kernels, gpu) -> None:
    for cfg in extra_kernels:
        reasons = legality.violations(cfg, gpu)
        if reasons:
            raise BuildError(f"kernel {cfg.procedural_name()} cannot run on {gpu.name}: {'; '.join(reasons)}")


def check_plan_served(plan, allow_partial: bool) -> None:
    """A build that serves nothing is refused; one that serves only part of its GEMMs needs ``allow_partial``."""
    if not plan.unserved():
        return
    if not plan.kernels():
        raise BuildError(f"no kernel serves any GEMM of this plan, so the build would serve nothing: "
                         f"{plan.unserved_summary()}; {UNSERVED_FIX}")
    if not allow_partial:
        raise BuildError(f"the plan has GEMMs without a kernel: {plan.unserved_summary()}; {UNSERVED_FIX}, or pass "
                         f"--allow-partial to build the rest (the library then refuses those problems)")


def plan_arch(kernels: list[KernelConfig], gpu) -> str:
    archs = {cfg.arch for cfg in kernels} or {gpu.kernel_arch}
    if len(archs) != 1:
        raise BuildError(f"a build targets one architecture; the plan mixes {sorted(archs)}")
    return archs.pop()


def render_sources(plan, kernels: list[KernelConfig], arch: str, build_dir: Path,
                   nvcc_version: str | None, files: LibraryFiles) -> tuple[list[Path], int]:
    """Write src/, runtime/ and include/; remove rendered kernels the plan no longer has."""
    written = []
    for cfg in kernels:
        written.append(write_if_different(build_dir / "src" / f"{cfg.procedural_name()}.cu",
                                          render_kernel(cfg, nvcc_version)))
    routes = routes_of(plan, kernels)
    context = {
        "kernels": [{"name": c.procedural_name(), "act_format": ACT_FORMAT_ENUM[family_of(c).act_format],
                     "act_bits": c.act_bits, "weight_layout": WEIGHT_LAYOUT_ENUM[family_of(c).weight_layout]}
                    for c in kernels],
        "routes": [{**r.__dict__, "dtype": DTYPE_ENUM[r.dtype]} for r in routes],
        "problems": [{"n": n, "k": k, "group": g, "act_bits": b, "dtype": DTYPE_ENUM[d]}
                     for n, k, g, b, d in dict.fromkeys((r.n, r.k, r.group, r.act_bits, r.dtype) for r in routes)],
        "sm_number": SM_NUMBER[arch],
        "version": __version__,
    }
    plan_hash = sha256_text(plan.to_yaml())
    written.append(write_if_different(build_dir / "src" / "dispatch.cu",
                                      render_template("dispatch.cu.jinja", context, inputs={"plan": plan_hash})))
    for name in (*RUNTIME_SOURCES, *RUNTIME_HEADERS):
        written.append(write_if_different(build_dir / "runtime" / name, (runtime_dir() / name).read_text()))
    written.append(write_if_different(build_dir / "include" / "apex4gen.h", (runtime_dir() / "apex4gen.h").read_text()))
    written.append(write_if_different(build_dir / files.header, render_build_header(plan, context, arch, files)))
    _remove_stale_headers(build_dir / "include", {"apex4gen.h", Path(files.header).name})
    _remove_stale_sources(build_dir / "src", {w.path.name for w in written})
    return [w.path for w in written], sum(w.changed for w in written)


def render_build_header(plan, dispatch_context: dict, arch: str, files: LibraryFiles) -> str:
    kernels = [{"name": c["name"], "act_format": c["act_format"], "act_bits": c["act_bits"],
                "weight_layout": c["weight_layout"]} for c in dispatch_context["kernels"]]
    context = {"prefix": files.prefix, "gpu": plan.gpu, "arch": arch, "model": plan.model, "kernels": kernels}
    return render_template("build_header.h.jinja", context, inputs={"plan": sha256_text(plan.to_yaml())})


def _remove_stale_headers(include_dir: Path, keep: set[str]) -> None:
    """The header of the build's earlier prefix (a renamed build folder)."""
    for path in sorted(include_dir.glob("apex4gen_*.h")):
        if path.name not in keep and path.read_text().startswith("// Generated by apex4gen."):
            path.unlink()


def _remove_stale_sources(src_dir: Path, keep: set[str]) -> None:
    for path in sorted(src_dir.glob("*.cu")):
        if path.name not in keep and path.read_text().startswith("// Generated by apex4gen."):
            path.unlink()


def compile_units(build_dir: Path, kernels: list[KernelConfig], arch: str) -> list[CompileUnit]:
    """Commands use paths relative to the build directory (ninja runs there), so the same kernel compiles to
    the same command, and the same cache key, in every build."""
    flags = toolchain.nvcc_flags(arch, [*toolchain.cutlass_include_dirs(), Path("runtime")])
    nvcc = toolchain.nvcc_path()
    headers = "".join((build_dir / "runtime" / name).read_text() for name in RUNTIME_HEADERS)
    sources = [(Path("src") / f"{c.procedural_name()}.cu", c.procedural_name()) for c in kernels]
    sources += [(Path("src") / "dispatch.cu", "dispatch"),
                *[(Path("runtime") / name, f"runtime/{name}") for name in RUNTIME_SOURCES]]
    units = []
    for source, label in sources:
        command = [nvcc, *flags, "-c", str(source)]
        key = cache_key((build_dir / source).read_text() + headers, command,
                        (toolchain.nvcc_version(), toolchain.cutlass_version()))
        obj = object_path(source, key)
        units.append(CompileUnit(source, obj, (*command, "-o", str(obj)), label, key))
    return units


def link_command(units: list[CompileUnit], files: LibraryFiles) -> list[str]:
    """apex4gen/link.py: one prefixed object, then the static and the shared library (see its docstring)."""
    return [sys.executable, str(Path(__file__).with_name("link.py")), "--prefix", files.prefix,
            "--soname", files.soname, "--shared", files.shared, "--static", files.static,
            "--work", f"obj/{files.stem}", "--", toolchain.nvcc_path(), "--", *[str(u.obj) for u in units]]


def manifest_of(plan, kernels: list[KernelConfig], routes: list[Route], arch: str, units: list[CompileUnit],
                gpu, files: LibraryFiles) -> Manifest:
    return Manifest(
        apex4gen=__version__,
        cutlass=toolchain.cutlass_version(),
        nvcc=toolchain.nvcc_version(),
        gpu=gpu.name,
        arch=arch,
        sm=SM_NUMBER[arch],
        ptx_embedded=not arch.endswith("a"),
        model=plan.model,
        out_dtype=plan.out_dtype,
        plan_sha256=manifest.plan_sha256(plan.to_yaml()),
        prefix=files.prefix,
        abi_version=abi_version(),
        library=files.development,
        static_library=files.static,
        header=files.header,
        kernels=tuple(KernelEntry(index=i, name=c.procedural_name(), config=c.to_dict(),
                                  act_format=family_of(c).act_format, act_bits=c.act_bits,
                                  weight_layout=family_of(c).weight_layout,
                                  source=f"src/{c.procedural_name()}.cu")
                      for i, c in enumerate(kernels)),
        routes=tuple(routes),
        compile=tuple(CompileCommand(str(u.source), str(u.obj), u.command) for u in units),
    )


# What a plan was made from: a build folder made from other inputs is another user's build, never replaced silently
_PLAN_INPUTS = ("gpu", "gpu_spec_sha256", "model", "model_spec_sha256", "fused", "out_dtype", "workload", "budget")


def _other_inputs(build_dir: Path, plan) -> list[str]:
    """The plan inputs on which the build already in ``build_dir`` differs from ``plan`` (none if no build)."""
    try:
        built = yaml.safe_load((build_dir / "plan.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(built, dict):
        return []
    ours = plan.to_dict()
    return [key for key in _PLAN_INPUTS if built.get(key) != ours[key]]


def check_build_dir(build_dir: Path, force: bool, plan) -> None:
    """Refuse to write into a directory that holds something other than an apex4gen build, or a build of other
    inputs (another model or GPU spec file of the same name, another workload or budget)."""
    if not build_dir.exists() or force:
        return
    if not build_dir.is_dir():
        raise Apex4genError(f"{build_dir} exists and is not a directory; choose another --out")
    differ = _other_inputs(build_dir, plan)
    if differ:
        raise Apex4genError(f"{build_dir} holds a build made from other inputs ({', '.join(differ)} differ); "
                            "pass --force to replace it, or choose another --out")
    manifests = {manifest.NAME, manifest.ASIDE}
    ours = {"plan.yaml", *manifests, "src", "runtime", "include", "obj", "lib", "build.ninja",
            ".ninja_log", ".ninja_deps"}
    present = {p.name for p in build_dir.iterdir()}
    foreign = sorted(present - ours)
    if present and not foreign and not present & {"plan.yaml", *manifests}:
        foreign = sorted(present)  # our folder names, but no build ever wrote here
    if foreign:
        raise Apex4genError(f"{build_dir} holds files apex4gen did not write ({', '.join(foreign[:3])}); "
                            "choose another --out or pass --force")


def build(plan, gpu, build_dir: Path, emit_only: bool = False, jobs: int | None = None,
          progress: bool = True, force: bool = False, allow_partial: bool = False,
          extra_kernels: tuple[KernelConfig, ...] = ()) -> BuildResult:
    """Render, then (unless ``emit_only``) compile a plan's kernels into ``build_dir``. ``extra_kernels`` are
    compiled into the library without a route (called by index: ``apex4gen study`` times the planner's other
    candidates next to its choice)."""
    build_dir = Path(build_dir).absolute()  # ninja runs in build_dir: every path in a command is absolute
    files = LibraryFiles(prefix_of(build_dir.name))
    check_plan_served(plan, allow_partial)
    check_build_dir(build_dir, force, plan)
    check_plan_legal(plan, gpu)
    _check_extra_legal(extra_kernels, gpu)
    kernels = sorted(set(plan.kernels()) | set(extra_kernels))
    arch = plan_arch(kernels, gpu)
    nvcc_version = None if emit_only else toolchain.nvcc_version()
    build_dir.mkdir(parents=True, exist_ok=True)
    manifest.set_aside(build_dir)
    plan_changed = write_if_different(build_dir / "plan.yaml", plan.to_yaml()).changed
    _, changed = render_sources(plan, kernels, arch, build_dir, nvcc_version, files)
    names = tuple(c.procedural_name() for c in kernels)
    if emit_only:
        if not plan_changed and not changed:
            manifest.restore(build_dir)  # the built library still matches
        else:
            _remove_libraries(build_dir)  # they no longer match the sources: nothing loadable stays
        return BuildResult(build_dir, None, names, 0, changed)
    units = compile_units(build_dir, kernels, arch)
    write_ninja(build_dir, units, link_command(units, files), (files.shared, files.static))
    (build_dir / "lib").mkdir(exist_ok=True)
    steps = run_ninja(build_dir, units, jobs, progress)
    remove_stale_objects(build_dir, {u.obj.name for u in units})
    _remove_stale_libraries(build_dir, files)
    manifest.settle(build_dir, manifest_of(plan, kernels, routes_of(plan, kernels), arch, units, gpu, files))
    return BuildResult(build_dir, build_dir / files.development, names, steps, changed)


def _remove_libraries(build_dir: Path) -> None:
    for path in (build_dir / "lib").glob("libapex4gen*"):
        if _LIBRARY_FILE.fullmatch(path.name):
            path.unlink()


def _remove_stale_libraries(build_dir: Path, files: LibraryFiles) -> None:
    """Libraries of an earlier prefix or version (a renamed build folder, a new apex4gen release), and the
    link's intermediate files of an earlier prefix (obj/libapex4gen_<prefix>.*)."""
    keep = {Path(f).name for f in (files.shared, files.static, files.development)} | {files.soname}
    for path in (build_dir / "lib").iterdir():
        if path.name not in keep and _LIBRARY_FILE.fullmatch(path.name):
            path.unlink()
    for path in (build_dir / "obj").glob("libapex4gen_*"):
        if path.name.split(".")[0] != files.stem:
            path.unlink()


def default_build_dir(gpu_name: str, model_name: str, root: Path | None = None) -> Path:
    return (root or Path("generated")) / f"{gpu_name}-{model_name}"
