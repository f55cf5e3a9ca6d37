"""Granularity: how a tensor is cut into groups that share a scale, parsed once from its text form.

``tensor`` (one group), ``channel[:AXIS]`` (one row per index along ``AXIS``, default 0) and ``group:G[:AXIS]``
(each row split into groups of ``G`` elements; the last group of a row may be shorter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dfquant.errors import ConfigError

GranularityKind = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class Granularity:
    """Where scales are shared: the whole tensor, each channel along ``axis``, or groups of ``group_size``
    consecutive elements within each channel's row.

    Parse from text with :meth:`parse`: ``"tensor"``, ``"channel"`` (axis 0), ``"channel:1"``, ``"group:64"``
    (groups of 64 along each output channel's flattened row), ``"group:64:1"`` (rows along axis 1).
    """

    kind: GranularityKind = "channel"
    axis: int = 0
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("tensor", "channel", "group"):
            raise ConfigError(f"granularity must be 'tensor', 'channel' or 'group:G', got '{self.kind}'")
        if self.kind == "group" and (self.group_size is None or self.group_size < 1):
            raise ConfigError(f"group granularity needs a group size >= 1, got {self.group_size}")
        if self.kind != "group" and self.group_size is not None:
            raise ConfigError(f"granularity '{self.kind}' takes no group size")

    @classmethod
    def parse(cls, spec: str | Granularity) -> Granularity:
        """Parse ``tensor``, ``channel[:AXIS]`` or ``group:G[:AXIS]``."""
        if isinstance(spec, Granularity):
            return spec
        parts = str(spec).strip().lower().split(":")
        try:
            if parts[0] in ("tensor", "per-tensor") and len(parts) == 1:
                return cls("tensor")
            if parts[0] in ("channel", "per-channel") and len(parts) <= 2:
                return cls("channel", int(parts[1]) if len(parts) == 2 else 0)
            if parts[0] == "group" and len(parts) in (2, 3):
                return cls("group", int(parts[2]) if len(parts) == 3 else 0, int(parts[1]))
        except ValueError:
            pass
        raise ConfigError(f"granularity '{spec}' not understood; allowed: tensor, channel[:AXIS], group:G[:AXIS]")

    def __str__(self) -> str:
        if self.kind == "tensor":
            return "tensor"
        suffix = f":{self.axis}" if self.axis else ""
        return f"channel{suffix}" if self.kind == "channel" else f"group:{self.group_size}{suffix}"
