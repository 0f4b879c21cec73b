"""Reading TOML tables with key paths: every problem names its key, line and expectation.

``Reader`` collects problems; ``Table`` wraps one TOML table, remembers which keys were read
(so the rest are "unknown key" errors) and checks types and values; ``KeyLines`` finds the
line of a key path in the text, since tomllib keeps no positions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from mirrorrouter.sizes import parse_size

T = TypeVar("T")
KeyPath = tuple[str | int, ...]


Check = Callable[[Any], str | None]  # returns what was expected, or None when fine

_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h|d|w))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> float | None:
    """Seconds from a number or a string like ``90s``, ``5m``, ``1h30m``, ``7d``; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value >= 0 else None
    if isinstance(value, str) and _DURATION_RE.fullmatch(value):
        return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(value))
    return None


def between(low: int, high: int) -> Check:
    return lambda v: None if low <= v <= high else f"a number from {low} to {high}"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


def strings(value: list[Any]) -> str | None:
    return None if all(isinstance(v, str) for v in value) else "a list of strings"


class Missing:
    pass


MISSING: Any = Missing()
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", bool: "true or false"}


class Reader:
    """Collects problems, each with its key path and line."""

    def __init__(self, label: str, lines: KeyLines, env: Mapping[str, str]) -> None:
        self.label = label
        self.lines = lines
        self.env = env
        self.problems: list[str] = []

    def problem(self, path: KeyPath, message: str) -> None:
        line = self.lines.locate(path)
        where = f"{self.label}:{line}" if line else self.label
        self.problems.append(f"{where}: {format_path(path)}: {message}")


class Table:
    """A TOML table being read; remembers which keys were used so that the rest are errors."""

    def __init__(self, reader: Reader, data: Any, path: KeyPath, present: bool = True) -> None:
        self.reader = reader
        self.path = path
        self.present = present
        if not isinstance(data, dict):
            reader.problem(path, "expected a table")
            data = {}
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def names(self) -> list[str]:
        self.used.update(self.data)
        return list(self.data)

    def get(
        self,
        key: str,
        kind: type[T],
        default: T | None,
        *,
        check: Check | None = None,
        required: bool = False,
        shown: Callable[[Any], str] = repr,
    ) -> T | Any:
        """The value of ``key`` checked by type and ``check``; ``shown`` renders a refused
        value in the problem (a URL that may carry credentials is shown redacted)."""
        self.used.add(key)
        if key not in self.data:
            if required:
                self.reader.problem((*self.path, key), "is required")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.reader.problem((*self.path, key), f"expected {_TYPE_NAMES.get(kind, kind)}")
            return default
        expected = check(value) if check else None
        if expected:
            self.reader.problem((*self.path, key), f"expected {expected}, got {shown(value)}")
            return default
        return value

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        self.used.add(key)
        if key not in self.data:
            return default
        seconds = parse_duration(self.data[key])
        if seconds is None or (positive and seconds == 0):
            self.reader.problem(
                (*self.path, key),
                f"expected a duration such as 30s, 5m, 1h30m or 7d (or seconds), "
                f"got {self.data[key]!r}",
            )
            return default
        return seconds

    @overload
    def size(self, key: str, default: int, *, zero: bool = False) -> int: ...

    @overload
    def size(self, key: str, default: None = None, *, zero: bool = False) -> int | None: ...

    def size(self, key: str, default: int | None = None, *, zero: bool = False) -> int | None:
        """A positive byte size (``parse_size``; ``zero``: 0 too, which turns something off),
        or ``default`` when the key is absent."""
        self.used.add(key)
        if key not in self.data:
            return default
        size = parse_size(self.data[key])
        if size is None or (size == 0 and not zero):
            least = "0 or more" if zero else "more than 0"
            self.reader.problem(
                (*self.path, key),
                f"expected a size such as 500MiB, 20GiB or 1TB (or a number of bytes, "
                f"{least}), got {self.data[key]!r}",
            )
            return default
        return size

    def table(self, key: str) -> Table:
        self.used.add(key)
        return Table(self.reader, self.data.get(key, {}), (*self.path, key), key in self.data)

    def tables(self, key: str) -> list[Table]:
        self.used.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list):
            self.reader.problem((*self.path, key), "expected a list of tables")
            return []
        return [Table(self.reader, item, (*self.path, key, i)) for i, item in enumerate(value)]

    def finish(self, known: tuple[str, ...] | None = None) -> None:
        allowed = set(known) if known is not None else self.used
        for key in self.data:
            if key not in allowed:
                hint = ", ".join(sorted(allowed)) or "none"
                self.reader.problem((*self.path, key), f"unknown key; expected one of: {hint}")


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def format_path(path: KeyPath) -> str:
    """``("upstreams", "gcr.io", "mirrors", 0, "url")`` -> ``upstreams."gcr.io".mirrors[0].url``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            shown = part if _BARE_KEY_RE.fullmatch(part) else f'"{part}"'
            text += f".{shown}" if text else shown
    return text or "<top level>"


class KeyLines:
    """Best-effort map from key paths to line numbers, read off the TOML text.

    tomllib keeps no positions, so table headers (``[a."b"]``, ``[[routes]]``) and
    ``key =`` lines are scanned; a key inside an inline table is located at its parent.
    """

    _HEADER_RE = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*\]\]?\s*(?:#.*)?$")
    _KEY_RE = re.compile(r'^\s*("[^"]*"|[A-Za-z0-9_.-]+)\s*=')

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        current: KeyPath = ()
        counts: dict[KeyPath, int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            header = self._HEADER_RE.match(line)
            if header:
                path = split_key(header.group(2))
                if header.group(1) == "[[":
                    index = counts.get(path, 0)
                    counts[path] = index + 1
                    path = (*path, index)
                current = path
                self.lines.setdefault(current, number)
                continue
            key = self._KEY_RE.match(line)
            if key:
                self.lines.setdefault((*current, *split_key(key.group(1))), number)

    def locate(self, path: KeyPath) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def split_key(text: str) -> KeyPath:
    return tuple(p.strip().strip('"') for p in re.findall(r'"[^"]*"|[^.]+', text))
