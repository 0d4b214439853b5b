"""Strict reading of YAML mappings, shared by specs, budgets and plans.

Every error is a :class:`~apex4gen.errors.SpecError` whose one-line message names the file and the dotted
field, so a user can fix a hand-written YAML file without reading a traceback.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable

import yaml

from .errors import SpecError

REQUIRED = object()

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a mapping", list: "a list"}


def nearest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, sorted(choices), n=n, cutoff=0.5)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = nearest(word, choices)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def read_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(f"{path}: cannot read the file ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        raise SpecError(f"{path}:{line} not valid YAML ({getattr(err, 'problem', None) or err})") from None


def _describe(value: object) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


class Fields:
    """One YAML mapping being read. Unknown keys are rejected up front, with the nearest valid names."""

    def __init__(self, data: object, file: str | Path, prefix: str, allowed: Iterable[str]):
        self.file = str(file)
        self.prefix = prefix
        if not isinstance(data, dict):
            raise self.error("", f"must be a mapping, got {_describe(data)}")
        allowed = tuple(allowed)
        for key in sorted(map(str, data)):
            if key not in allowed:
                raise self.error(key, "unknown field" + did_you_mean(key, allowed)
                                 + f" (valid: {', '.join(allowed)})")
        self.data = data

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix and key else (key or self.prefix or "(top level)")

    def error(self, key: str, problem: str) -> SpecError:
        return SpecError(f"{self.file}: field '{self.name(key)}': {problem}")

    def has(self, key: str) -> bool:
        return key in self.data

    def take(self, key: str, kind: type, default: object = REQUIRED):
        """The value of ``key`` checked to be of ``kind`` (ints are accepted as floats, bools never as numbers)."""
        if key not in self.data:
            if default is REQUIRED:
                raise self.error(key, "missing")
            return default
        value = self.data[key]
        if value is None and default is None:
            return None
        if isinstance(value, bool) and kind is not bool:
            raise self.error(key, f"must be {_TYPE_NAMES[kind]}, got {_describe(value)}")
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise self.error(key, f"must be {_TYPE_NAMES[kind]}, got {_describe(value)}")
        return value

    def positive(self, key: str, kind: type, default: object = REQUIRED):
        value = self.take(key, kind, default)
        if value is not None and value <= 0:
            raise self.error(key, f"must be > 0, got {value}")
        return value

    def choice(self, key: str, choices: Iterable[str], default: object = REQUIRED):
        value = self.take(key, str, default)
        choices = tuple(choices)
        if value is not None and value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}" + did_you_mean(value, choices))
        return value

    def sub(self, key: str, allowed: Iterable[str], default: object = REQUIRED) -> "Fields | None":
        if key not in self.data and default is not REQUIRED:
            return default
        return Fields(self.take(key, dict), self.file, self.name(key), allowed)

    def items(self, key: str) -> list:
        return self.take(key, list)
