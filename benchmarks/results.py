"""Samples per measure, contender and round; the summary table; the JSON document."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Measure:
    """One quantity measured for several contenders, one sample per round (None: failed)."""

    key: str
    title: str
    unit: str
    better: str  # "higher", "lower" or "" (a count, a fact)
    rounds: int
    values: dict[str, list[float | None]] = field(default_factory=dict)
    raw: dict[str, list[Any]] = field(default_factory=dict)
    errors: dict[str, list[str | None]] = field(default_factory=dict)

    def _slot(self, contender: str) -> None:
        if contender not in self.values:
            self.values[contender] = [None] * self.rounds
            self.raw[contender] = [None] * self.rounds
            self.errors[contender] = [None] * self.rounds

    def record(self, contender: str, round_index: int, value: float, raw: Any = None) -> None:
        self._slot(contender)
        self.values[contender][round_index] = value
        self.raw[contender][round_index] = raw

    def fail(self, contender: str, round_index: int, error: str, raw: Any = None) -> None:
        self._slot(contender)
        self.errors[contender][round_index] = error
        self.raw[contender][round_index] = raw

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "unit": self.unit,
            "better": self.better,
            "values": self.values,
            "errors": {k: v for k, v in self.errors.items() if any(v)},
            "raw": self.raw,
        }


@dataclass(frozen=True)
class Summary:
    """Median and range of the samples; ``missing`` counts rounds without one."""

    median: float | None
    low: float | None
    high: float | None
    samples: int
    missing: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Summary:
        good = [v for v in values if v is not None]
        missing = len(values) - len(good)
        if not good:
            return cls(None, None, None, 0, missing)
        return cls(statistics.median(good), min(good), max(good), len(good), missing)


@dataclass(frozen=True)
class Row:
    """A table row: one contender's value, or a ratio of two series paired by round."""

    section: str
    label: str
    measure: str
    contender: str
    unit: str
    scale: float = 1.0  # the value shown is value / scale
    digits: int = 2
    over: tuple[str, str] | None = None  # (measure, contender) of a ratio's denominator


class Results:
    """All measures of one run."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.measures: dict[str, Measure] = {}
        self.warnings: list[str] = []

    def measure(self, key: str, title: str, unit: str, better: str = "") -> Measure:
        if key not in self.measures:
            self.measures[key] = Measure(key, title, unit, better, self.rounds)
        return self.measures[key]

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def series(self, measure: str, contender: str) -> list[float | None]:
        found = self.measures.get(measure)
        if found is None or contender not in found.values:
            return [None] * self.rounds
        return found.values[contender]

    def row_values(self, row: Row) -> list[float | None]:
        top = self.series(row.measure, row.contender)
        if row.over is None:
            return [None if v is None else v / row.scale for v in top]
        bottom = self.series(*row.over)
        return [
            None if a is None or b is None or b == 0 else a / b
            for a, b in zip(top, bottom, strict=True)
        ]

    def failed_rounds(self, row: Row) -> int:
        """Rounds in which a series of the row recorded an error (not merely did not run)."""
        keys = [(row.measure, row.contender)] + ([row.over] if row.over else [])
        failed = [False] * self.rounds
        for measure, contender in keys:
            m = self.measures.get(measure)
            for i, error in enumerate(m.errors.get(contender, []) if m else []):
                failed[i] = failed[i] or bool(error)
        return sum(failed)

    def summary(self, rows: Sequence[Row]) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            s = Summary.of(self.row_values(row))
            out.append(
                {
                    "section": row.section,
                    "label": row.label,
                    "unit": row.unit,
                    "median": s.median,
                    "min": s.low,
                    "max": s.high,
                    "samples": s.samples,
                    "failed_rounds": self.failed_rounds(row),
                    "per_round": self.row_values(row),
                }
            )
        return out

    def table(self, rows: Sequence[Row]) -> str:
        """The one table: section, what, median [min, max], unit; ERROR where all failed."""
        lines = []
        widths = (max(len(r.section) for r in rows), max(len(r.label) for r in rows))
        header = (
            f"{'measure':<{widths[0]}}  {'contender / ratio':<{widths[1]}}  "
            f"{'median':>9}  {'[min, max]':<21}  unit"
        )
        lines.append(header)
        lines.append("-" * (len(header) + 14))
        previous = None
        for row in rows:
            section = row.section if row.section != previous else ""
            if row.section != previous and previous is not None:
                lines.append("")
            previous = row.section
            s = Summary.of(self.row_values(row))
            failed = self.failed_rounds(row)
            if s.median is None:
                shown = f"{'ERROR' if failed else 'not run':>9}  {'':<21}"
            else:
                assert s.low is not None and s.high is not None
                d = row.digits
                spread = f"[{s.low:.{d}f}, {s.high:.{d}f}]"
                shown = f"{s.median:>9.{d}f}  {spread:<21}"
            note = f"  ({failed} of {self.rounds} rounds failed)" if failed else ""
            lines.append(
                f"{section:<{widths[0]}}  {row.label:<{widths[1]}}  {shown}  {row.unit}{note}"
            )
        return "\n".join(lines)
