"""Container sizes: named sizes and explicit MEMORY[:CPUS] values."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    memory_mb: int
    cpus: float


NAMED_SIZES: dict[str, Size] = {
    "xs": Size(128, 0.25),
    "s": Size(256, 0.5),
    "m": Size(512, 1.0),
    "l": Size(1024, 2.0),
    "xl": Size(2048, 4.0),
}
DEFAULT_SIZE = "s"

_EXPLICIT = re.compile(r"([0-9]+)([mg])(?::([0-9]+(?:\.[0-9]+)?))?")  # ASCII digits only


def parse_size(text: str) -> Size:
    """A named size (xs, s, m, l, xl) or MEMORY[:CPUS] such as 300m, 1g:2 or 512m:0.5."""
    key = text.strip().lower()
    if key in NAMED_SIZES:
        return NAMED_SIZES[key]
    match = _EXPLICIT.fullmatch(key)
    if not match:
        names = ", ".join(NAMED_SIZES)
        raise ValueError(f"size {text!r} is neither a named size ({names}) nor MEMORY[:CPUS] like 512m:0.5")
    amount, unit, cpus = match.groups()
    memory_mb = int(amount) * (1024 if unit == "g" else 1)
    size = Size(memory_mb, float(cpus) if cpus else NAMED_SIZES[DEFAULT_SIZE].cpus)
    if size.memory_mb < 6:
        raise ValueError("size: memory must be at least 6m (Docker's minimum)")
    if size.cpus <= 0:
        raise ValueError("size: CPUs must be more than 0")
    return size
