"""The object cache: the key that names an object, where the shared cache lives, and the compile wrapper.

An object is named by the key of what is compiled (rendered source with the runtime headers, the full nvcc
command with nvcc's environment flags, the toolchain versions), in the build's ``obj/`` and in a
content-addressed cache shared by every build on this machine: a hit is the object nvcc would produce.

The build's ninja file runs this file as a script around each compile (so that it starts without importing
torch, or anything but the standard library)::

    python objcache.py CACHE_DIR KEY OUTPUT -- nvcc ...

A miss compiles and stores the result atomically.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# nvcc reads these from the environment as if they were on its command line (and the host compiler it runs)
_NVCC_ENVIRONMENT = ("NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN")
_OBJECT_NAME = re.compile(r".+-[0-9a-f]{16}\.o")


def cache_key(compiled_text: str, command: list[str], toolchain_versions: tuple[str, ...]) -> str:
    """Hash of what is compiled: source and runtime headers, the full command (with nvcc's environment flags),
    the toolchain versions (nvcc, CUTLASS)."""
    h = hashlib.sha256()
    environment = "\0".join(f"{name}={os.environ.get(name, '')}" for name in _NVCC_ENVIRONMENT)
    for part in (compiled_text, "\0".join(command), environment, *toolchain_versions):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()


def object_path(source: Path, key: str) -> Path:
    """``obj/<source stem>-<16 hex of the key>.o``, relative to the build directory."""
    return Path("obj") / f"{source.stem}-{key[:16]}.o"


def remove_stale_objects(build_dir: Path, keep: set[str]) -> None:
    """Objects of earlier builds: named as :func:`object_path` names them, and not in ``keep``."""
    for path in (build_dir / "obj").glob("*.o"):
        if path.name not in keep and _OBJECT_NAME.fullmatch(path.name):
            path.unlink()


def cache_dir() -> Path | None:
    """Shared object cache (``APEX4GEN_CACHE_DIR``; empty disables it)."""
    configured = os.environ.get("APEX4GEN_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured else None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "apex4gen" / "objects"


def wrapped_command(command: tuple[str, ...], key: str, obj: Path, cache: Path | None) -> list[str]:
    """The compile ``command`` as ninja runs it: through this script when a cache is configured."""
    if cache is None:
        return list(command)
    return [sys.executable, str(Path(__file__)), str(cache), key, str(obj), "--", *command]


def main(argv: list[str]) -> int:
    directory, key, output, sep, *command = argv[1:]
    if sep != "--" or not command:
        sys.stderr.write("usage: objcache.py CACHE_DIR KEY OUTPUT -- COMMAND...\n")
        return 2
    cached = os.path.join(directory, key + ".o")
    if os.path.isfile(cached):
        shutil.copyfile(cached, output)
        return 0
    status = subprocess.call(command)
    if status == 0:
        os.makedirs(directory, exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        shutil.copyfile(output, tmp)
        os.replace(tmp, cached)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
