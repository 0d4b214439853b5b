"""The probe library: render templates/probe.cu.jinja for one arch and build it as every kernel is built (the
build's nvcc flags, an object named by its cache key and shared through the object cache, ninja), into
``<cache>/apex4gen/probe/<arch>/lib/libapex4gen_probe.so``. An unchanged rebuild runs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import toolchain
from ..emit import render_template
from ..errors import Apex4genError
from ..files import write_if_different
from ..ninjabuild import CompileUnit, run_ninja, write_ninja
from ..objcache import cache_key, object_path, remove_stale_objects
from ..paths import runtime_dir, user_cache_dir
from .catalog import ARCHS, STREAM_DEPTH, probes_for

ABI_VERSION = 1
TEMPLATE = "probe.cu.jinja"
SOURCE = Path("src") / "probe.cu"
LIBRARY = Path("lib") / "libapex4gen_probe.so"
HEADERS = ("apex4gen.h", "probe/probe.cuh")  # under runtime/, copied into the build folder

# The wgmma instruction wrappers the template renders on sm_90a: operand types, the immediates after the
# scale-d predicate (scale-a, scale-b; for fp16 also the transposes: both K-major), accumulator type.
_WGMMA = (
    {"struct": "WgmmaS8", "k": 32, "types": "s32.s8.s8", "immediates": "", "acc_type": "uint32_t",
     "constraint": "r"},
    {"struct": "WgmmaE4M3", "k": 32, "types": "f32.e4m3.e4m3", "immediates": ", 1, 1", "acc_type": "float",
     "constraint": "f"},
    {"struct": "WgmmaF16", "k": 16, "types": "f32.f16.f16", "immediates": ", 1, 1, 0, 0", "acc_type": "float",
     "constraint": "f"},
)


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise Apex4genError(f"no probe kernels for {arch}: apex4gen probes {', '.join(ARCHS)}")


def render(arch: str) -> str:
    """The probe source of one arch (deterministic: the same text for the same arch and apex4gen version)."""
    check_arch(arch)
    probes = probes_for(arch)
    structs = {p.kernel.split("<")[1].split(",")[0] for p in probes}
    context = {
        "arch": arch,
        "abi_version": ABI_VERSION,
        "stream_depth": STREAM_DEPTH,
        "probes": [{"name": p.name, "kernel": p.kernel, "threads": p.threads, "max_ctas_per_sm": p.max_ctas_per_sm,
                    "unit": p.unit} for p in probes],
        "wgmmas": [w for w in _WGMMA if w["struct"] in structs],
    }
    return render_template(TEMPLATE, context, extra={"probe arch": arch})


def default_root() -> Path:
    """``$XDG_CACHE_HOME/apex4gen/probe`` (``~/.cache`` without it), one folder per arch below."""
    return user_cache_dir() / "probe"


@dataclass(frozen=True)
class ProbeBuild:
    build_dir: Path
    library: Path
    obj: Path
    compiled: int  # steps ninja ran (0: everything was up to date)


def _write_sources(build_dir: Path, arch: str) -> str:
    """src/probe.cu and the headers it includes; returns the text the object's cache key covers."""
    source = render(arch)
    write_if_different(build_dir / SOURCE, source)
    headers = [(runtime_dir() / name).read_text() for name in HEADERS]
    for name, text in zip(HEADERS, headers):
        write_if_different(build_dir / "runtime" / name, text)
    return source + "".join(headers)


def compile_unit(build_dir: Path, arch: str) -> CompileUnit:
    compiled = _write_sources(build_dir, arch)
    command = [toolchain.nvcc_path(), *toolchain.nvcc_flags(arch, [Path("runtime")]), "-c", str(SOURCE)]
    key = cache_key(compiled, command, (toolchain.nvcc_version(),))
    obj = object_path(SOURCE, key)
    return CompileUnit(SOURCE, obj, (*command, "-o", str(obj)), f"probe kernels ({arch})", key)


def build(arch: str, root: Path | None = None, progress: bool = True) -> ProbeBuild:
    """Render and compile the probe library for ``arch`` (cudart linked statically, as the builds' libraries)."""
    build_dir = (Path(root) if root is not None else default_root()).absolute() / arch
    unit = compile_unit(build_dir, arch)
    link = [toolchain.nvcc_path(), "-shared", "-o", str(LIBRARY), str(unit.obj)]
    write_ninja(build_dir, [unit], link, (str(LIBRARY),))
    (build_dir / "lib").mkdir(exist_ok=True)
    steps = run_ninja(build_dir, [unit], None, progress)
    remove_stale_objects(build_dir, {unit.obj.name})
    return ProbeBuild(build_dir, build_dir / LIBRARY, build_dir / unit.obj, steps)
