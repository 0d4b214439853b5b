"""The quantization granularity: how many consecutive K elements share one scale.

One value type, :class:`Granularity`, is the only encoding inside Python (planner, cost model, budget, plan,
kernel configs, accuracy methods). Files keep the human spellings ``"g128"`` and ``"channel"`` (:meth:`parse`,
:attr:`Granularity.name`); the C++ side gets integers from the two conversions here:

* :meth:`Granularity.size`: the elements a scale covers for a given K, which is also the ``group`` argument of
  the C ABI (``apex4gen_select_kernel``, routes, the manifest): K for per-channel;
* :attr:`Granularity.template_group`: the compile-time ``kGroup`` of a kernel template, where K is not known
  yet: 0 for per-channel.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import SpecError

_GROUP_NAME = re.compile(r"^g([1-9][0-9]*)$")
CHANNEL_NAME = "channel"


@functools.total_ordering
@dataclass(frozen=True)
class Granularity:
    """``group`` elements a scale, or per-channel (``group`` None: one group spanning K). Ordered fine to
    coarse: g64 < g128 < ... < channel."""

    group: int | None

    def __post_init__(self) -> None:
        if self.group is not None and (not isinstance(self.group, int) or self.group <= 0):
            raise ValueError(f"a group size is a positive int, got {self.group!r}")

    @classmethod
    def parse(cls, text: str) -> "Granularity":
        """``"g128"`` or ``"channel"`` (what plans, budgets and the command line spell)."""
        if text == CHANNEL_NAME:
            return CHANNEL
        match = _GROUP_NAME.match(str(text))
        if not match:
            raise SpecError(f"unknown granularity {text!r}: use 'channel' or 'g<size>' such as 'g128'")
        return cls(int(match.group(1)))

    @classmethod
    def of_size(cls, group: int, k: int) -> "Granularity":
        """The granularity of a tensor quantized with ``group`` elements a scale along ``k``."""
        return CHANNEL if group == k else cls(group)

    @property
    def name(self) -> str:
        return CHANNEL_NAME if self.group is None else f"g{self.group}"

    @property
    def is_channel(self) -> bool:
        return self.group is None

    def size(self, k: int) -> int:
        """Elements a scale covers along ``k``; also the C ABI's ``group`` argument (K for per-channel)."""
        return k if self.group is None else self.group

    def fits(self, k: int) -> bool:
        return k % self.size(k) == 0

    @property
    def template_group(self) -> int:
        """A kernel template's compile-time ``kGroup``: 0 for per-channel (K is a run-time argument)."""
        return 0 if self.group is None else self.group

    def __lt__(self, other: "Granularity") -> bool:
        return self._order() < other._order()

    def _order(self) -> tuple[bool, int]:
        return (self.group is None, self.group or 0)

    def __str__(self) -> str:
        return self.name


CHANNEL = Granularity(None)
G128 = Granularity(128)
# The planner's candidates, fine to coarse.
GRANULARITIES: tuple[Granularity, ...] = (Granularity(64), G128, Granularity(256), Granularity(512),
                                          Granularity(1024), CHANNEL)
GRANULARITY_NAMES: tuple[str, ...] = tuple(g.name for g in GRANULARITIES)

