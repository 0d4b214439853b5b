"""The files of a build's library and the symbol prefix they carry.

Every build exports its C ABI as ``apex4gen_<prefix>_<name>`` (runtime/apex4gen.h), from
``lib/libapex4gen_<prefix>.so`` (SONAME ``libapex4gen_<prefix>.so.<ABI version>``) and
``lib/libapex4gen_<prefix>.a``, declared by ``include/apex4gen_<prefix>.h``. The prefix is the build folder's
name made an identifier (``generated/a40-llama2-70b`` -> ``a40_llama2_70b``), so two builds in one process
differ in every symbol and every file name.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from . import __version__
from .paths import runtime_dir

_PREFIX = re.compile(r"[a-z][a-z0-9_]*")


@functools.lru_cache(maxsize=1)
def abi_version() -> int:
    """APEX4GEN_ABI_VERSION of runtime/apex4gen.h."""
    header = (runtime_dir() / "apex4gen.h").read_text()
    return int(re.search(r"#define APEX4GEN_ABI_VERSION (\d+)", header).group(1))


def prefix_of(folder_name: str) -> str:
    """The build folder's name as a C identifier part: lower case, other characters as '_', a letter first."""
    prefix = re.sub(r"[^a-z0-9]+", "_", folder_name.lower()).strip("_") or "build"
    return prefix if prefix[0].isalpha() else f"b{prefix}"


@dataclass(frozen=True)
class LibraryFiles:
    """Paths relative to the build directory (and to an export's root)."""

    prefix: str

    def __post_init__(self):
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(f"symbol prefix {self.prefix!r} is not a lower-case C identifier")

    @property
    def stem(self) -> str:
        return f"libapex4gen_{self.prefix}"

    @property
    def shared(self) -> str:
        """The shared library's file: versioned by the apex4gen release."""
        return f"lib/{self.stem}.so.{__version__}"

    @property
    def soname(self) -> str:
        """What a program linked against the library asks the loader for: versioned by the ABI."""
        return f"{self.stem}.so.{abi_version()}"

    @property
    def development(self) -> str:
        """The unversioned link (what ``-l``, CMake and dlopen name)."""
        return f"lib/{self.stem}.so"

    @property
    def static(self) -> str:
        return f"lib/{self.stem}.a"

    @property
    def header(self) -> str:
        return f"include/apex4gen_{self.prefix}.h"

    def symbol(self, name: str) -> str:
        """The exported name of an ABI function (``select_kernel`` -> ``apex4gen_<prefix>_select_kernel``)."""
        return f"apex4gen_{self.prefix}_{name}"
