"""Where the shipped data lives: specs/, templates/ and runtime/ at the repository top level, installed as
the package-data packages ``apex4gen._specs``, ``apex4gen._templates`` and ``apex4gen._runtime``."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _data_dir(package: str, repo_name: str) -> Path:
    local = _REPO / repo_name
    if local.is_dir() and (_REPO / "pyproject.toml").is_file():
        return local
    return Path(str(resources.files(package)))


def specs_dir() -> Path:
    return _data_dir("apex4gen._specs", "specs")


def templates_dir() -> Path:
    return _data_dir("apex4gen._templates", "templates")


def runtime_dir() -> Path:
    return _data_dir("apex4gen._runtime", "runtime")


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/apex4gen``, else ``~/.cache/apex4gen``: the object cache, the probe's and the study's
    builds and the accuracy data live below it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apex4gen"
