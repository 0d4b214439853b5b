"""Progress bars for the long steps (calibration, GPTQ, evaluation), on stderr so stdout stays parseable."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track

T = TypeVar("T")
_STDERR = Console(stderr=True)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a bar; silent when APEX4GEN_QUIET=1 (tests, CI logs)."""
    disable = os.environ.get("APEX4GEN_QUIET") == "1"
    return iter(track(items, description=desc, total=total, console=_STDERR, disable=disable, transient=True))
