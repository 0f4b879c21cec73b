"""Byte sizes as people write and read them: one parser, one formatter.

- ``parse_size``: what a config or a command line says (``500MiB``, ``20GiB``, ``1TB``);
- ``format_size``: what the gateway shows of a size it measured (``1.5 KiB``): binary units,
  as limits are configured, one decimal; every table, page, summary and message uses it;
- ``format_limit``: a configured limit written back exactly (``1 MiB``), so the message that
  names it matches what the config says.
"""

from __future__ import annotations

import re
from fractions import Fraction

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate("kmgtp")},
    **{f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgtp")},
}


def parse_size(value: object) -> int | None:
    """Bytes from a number or a string like ``500MiB``, ``20GiB``, ``1TB``, ``1.5GB``; else None.

    ``KiB``, ``MiB``, ``GiB``, ``TiB``, ``PiB`` are powers of 1024; ``kB``, ``MB``, ``GB``,
    ``TB``, ``PB`` powers of 1000; ``B`` or no unit is bytes. Units ignore case; a
    fraction of a byte is dropped.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match:
            number, unit = match.groups()
            return int(Fraction(number) * _SIZE_UNITS[(unit or "b").lower()])
    return None


SPELLED_BYTES = "{:d} bytes"  # ``bytes_as`` of sizes in sentences


def format_size(size: int, *, bytes_as: str = "{:d} B") -> str:
    """``1536`` -> ``1.5 KiB``: binary units, one decimal. A size under 1 KiB is written by
    ``bytes_as``: ``512 B``; the status page groups digits like its other numbers
    (``"{:,} B"``), and sentences spell it (``"{:d} bytes"``)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return bytes_as.format(size) if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_limit(count: int) -> str:
    """A limit as configured: in whole MiB or KiB when it is one (``1 MiB``), else bytes."""
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if count % scale == 0:
            return f"{count // scale} {unit}"
    return f"{count} bytes"
