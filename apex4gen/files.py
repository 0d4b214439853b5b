"""Writing generated files: atomically, and only when the text differs (so that mtimes, and with them no-op
builds, survive a regeneration)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import Apex4genError


@dataclass(frozen=True)
class WriteResult:
    path: Path
    changed: bool


def write_if_different(path: str | Path, text: str) -> WriteResult:
    """Write ``text`` to ``path`` unless it already holds exactly that: a temporary file in the same folder, then a
    rename over the target (removed again if the write fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return WriteResult(path, False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return WriteResult(path, True)


def check_output_folder(path: Path | None, option: str) -> None:
    """Results written after minutes of measuring: an output path whose folder is missing is refused before."""
    if path is not None and not Path(path).parent.is_dir():
        raise Apex4genError(f"{option} {path}: the folder {Path(path).parent} does not exist; create it or give "
                            "another path")
