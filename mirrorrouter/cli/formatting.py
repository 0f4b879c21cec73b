"""How the commands write what they found: tables, digests, times and sizes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from mirrorrouter.sizes import SPELLED_BYTES, format_size


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart (the last one unpadded)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def short_digest(digest: str) -> str:
    """``sha256:`` and the first 12 hex digits."""
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}"


def size_in_words(size: int) -> str:
    """A size in a sentence: ``1.5 KiB``, ``0 bytes`` (sizes.format_size)."""
    return format_size(size, bytes_as=SPELLED_BYTES)


def format_time(seconds: float) -> str:
    """Wall-clock seconds as UTC, to the second; ``-`` for none."""
    if seconds <= 0:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
