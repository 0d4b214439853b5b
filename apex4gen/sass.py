"""What the compiler made of a kernel: resource usage and the SASS instruction mix of an object file, read with
``cuobjdump`` (CPU only; no GPU needed).

``cuobjdump`` comes from the CUDA toolkit or the PyPI wheel ``nvidia-cuda-cuobjdump``; disassembling needs
``nvdisasm`` beside it (``nvidia-cuda-nvdisasm``). A missing tool or object is :class:`SassUnavailable`, one
line that says what is missing and how to get it.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# The instruction classes that show which units a kernel computes on (see MIX_GROUPS)
TENSOR_CORE_OPCODES = ("HGMMA", "IGMMA", "QGMMA", "IMMA", "HMMA")
MIX_OPCODES = (*TENSOR_CORE_OPCODES, "I2F", "F2F", "I2FP", "FFMA", "FMUL", "LDGSTS", "UTMALDG", "LDL", "STL")

# Which tensor-core instructions prove that a kernel computes on the path its name claims: the opcode and the
# operand types in its modifiers (IMMA.16864.S4.S4, IGMMA.64x128x32.S8.S8, QGMMA.64x128x32.F32.E4M3.E4M3).
PATH_EVIDENCE = {
    "int4": (("IMMA",), ".S4"),
    "int8": (("IMMA", "IGMMA"), ".S8"),
    "fp8": (("QGMMA",), ".E4M3"),
}

_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_RESOURCE_FUNCTION = re.compile(r"^\s*Function\s+(\S+):\s*$")
_RESOURCE_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


class SassUnavailable(Exception):
    """The object or a tool to read it is missing: one line, what and how to fix it."""


@dataclass(frozen=True)
class Resources:
    """``cuobjdump --dump-resource-usage`` for one device function (bytes, per thread where it applies)."""

    function: str
    registers: int
    shared_static: int       # shared memory declared in the code; a launch adds its dynamic shared memory
    local: int               # local memory per thread: register spills and stack arrays
    stack: int
    constant: int            # constant bank 0: kernel parameters


@dataclass(frozen=True)
class FunctionSass:
    """The instruction counts of one device function: by opcode (``IMMA``) and by full opcode with its
    modifiers (``IMMA.16864.S4.S4``), each keyed in name order."""

    function: str
    instructions: int
    opcodes: dict
    variants: dict

    def count(self, opcode: str) -> int:
        return self.opcodes.get(opcode, 0)


@dataclass(frozen=True)
class PathEvidence:
    """Whether the SASS holds tensor-core instructions of the path a kernel's name claims."""

    path: str
    expected: str                        # e.g. "IMMA/IGMMA with .S8 operands"
    found: dict                          # matching variants and their counts
    ok: bool


@dataclass(frozen=True)
class ObjectReport:
    object: str
    resources: tuple[Resources, ...]
    functions: tuple[FunctionSass, ...]

    def total(self, opcode: str) -> int:
        return sum(f.count(opcode) for f in self.functions)

    def mix(self) -> dict[str, int]:
        return {op: self.total(op) for op in MIX_OPCODES}

    def evidence(self, path: str) -> PathEvidence:
        opcodes, operand = PATH_EVIDENCE[path]
        found = Counter()
        for f in self.functions:
            for variant, n in f.variants.items():
                if variant.split(".")[0] in opcodes and operand in variant:
                    found[variant] += n
        expected = f"{'/'.join(opcodes)} with {operand[1:]} operands"
        return PathEvidence(path, expected, dict(sorted(found.items())), bool(found))


# ---------------------------------------------------------------------------------------------- tools


def _wheel_binary(distribution: str, name: str) -> str | None:
    """A tool shipped inside a PyPI wheel (nvidia/cu13/bin/<name>), found through the wheel's file list."""
    try:
        files = importlib.metadata.distribution(distribution).files or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == name:
            path = Path(file.locate())
            return str(path) if os.access(path, os.X_OK) else None
    return None


def _find_tool(name: str, distribution: str, override: str) -> str | None:
    """``$<override>`` (only that, when set), PATH, the toolkit of nvcc, then the wheel."""
    if os.environ.get(override):
        return shutil.which(os.environ[override])
    found = shutil.which(name)
    if found:
        return found
    for nvcc in (os.environ.get("APEX4GEN_NVCC"), shutil.which("nvcc"),
                 str(Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda") / "bin" / "nvcc")):
        beside = Path(nvcc).resolve().parent / name if nvcc else None
        if beside is not None and os.access(beside, os.X_OK):
            return str(beside)
    return _wheel_binary(distribution, name)


@functools.lru_cache(maxsize=1)
def tools() -> tuple[str, str]:
    """(cuobjdump, nvdisasm): cuobjdump disassembles through nvdisasm."""
    cuobjdump = _find_tool("cuobjdump", "nvidia-cuda-cuobjdump", "APEX4GEN_CUOBJDUMP")
    nvdisasm = _find_tool("nvdisasm", "nvidia-cuda-nvdisasm", "APEX4GEN_NVDISASM")
    missing = [name for name, path in (("cuobjdump", cuobjdump), ("nvdisasm", nvdisasm)) if path is None]
    if missing:
        raise SassUnavailable(f"{' and '.join(missing)} not found: pip install nvidia-cuda-cuobjdump "
                              "nvidia-cuda-nvdisasm (or put the CUDA toolkit's bin folder on PATH)")
    return cuobjdump, nvdisasm


def _cuobjdump(option: str, obj: Path) -> str:
    cuobjdump, nvdisasm = tools()
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(nvdisasm).parent), os.environ.get("PATH", "")])}
    done = subprocess.run([cuobjdump, option, str(obj)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise SassUnavailable(f"cuobjdump {option} {obj} failed ({reason}); rebuild the build to refresh the object")
    return done.stdout


# ---------------------------------------------------------------------------------------------- parsing


def parse_resources(text: str) -> tuple[Resources, ...]:
    out = []
    function = None
    for line in text.splitlines():
        m = _RESOURCE_FUNCTION.match(line)
        if m:
            function = m.group(1)
            continue
        if function is not None and "REG:" in line:
            fields = {k: int(v) for k, v in _RESOURCE_FIELD.findall(line)}
            out.append(Resources(function, fields.get("REG", 0), fields.get("SHARED", 0), fields.get("LOCAL", 0),
                                 fields.get("STACK", 0), fields.get("CONSTANT[0]", 0)))
            function = None
    return tuple(out)


def parse_sass(text: str) -> tuple[FunctionSass, ...]:
    counts: dict[str, Counter] = {}
    current = None
    for line in text.splitlines():
        m = _FUNCTION.match(line)
        if m:
            current = counts.setdefault(m.group(1), Counter())
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            current[m.group(1)] += 1
    return tuple(_function_sass(name, variants) for name, variants in counts.items())


def _function_sass(name: str, variants: Counter) -> FunctionSass:
    opcodes = Counter()
    for variant, n in variants.items():
        opcodes[variant.split(".")[0]] += n
    return FunctionSass(name, sum(variants.values()), dict(sorted(opcodes.items())), dict(sorted(variants.items())))


def read_object(obj: Path) -> ObjectReport:
    """Resource usage and instruction mix of every device function in ``obj``."""
    if not obj.is_file():
        raise SassUnavailable(f"no object file {obj}: the build folder was copied without obj/ or the build did "
                              "not finish; rebuild it with `apex4gen build --gpu <gpu> --plan <build>/plan.yaml --out <build>`")
    resources = parse_resources(_cuobjdump("--dump-resource-usage", obj))
    functions = parse_sass(_cuobjdump("-sass", obj))
    return ObjectReport(str(obj), resources, functions)


def demangle(names: list[str]) -> dict[str, str]:
    """C++ names through c++filt where it exists (binutils); otherwise as they are."""
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    done = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True)
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))
