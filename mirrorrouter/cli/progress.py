"""How a long command shows itself: a progress bar per task on a terminal (rich), plain
lines otherwise, nothing in tests. ``warm``, ``export`` and ``import`` report through it."""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichBar

from mirrorrouter.cli.formatting import size_in_words


class Progress(Protocol):
    """How a long run shows itself: one task per image (or archive)."""

    def begin(self, label: str) -> int: ...

    def plan(self, task: int, total_bytes: int, total_items: int, unit: str) -> None: ...

    def update(self, task: int, done_bytes: int, done_items: int) -> None:
        """May be called from a worker thread."""
        ...

    def end(self, task: int, ok: bool, text: str) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def begin(self, label: str) -> int:
        return 0

    def plan(self, task: int, total_bytes: int, total_items: int, unit: str) -> None:
        pass

    def update(self, task: int, done_bytes: int, done_items: int) -> None:
        pass

    def end(self, task: int, ok: bool, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class PlainProgress:
    """Plain lines (not a TTY): one when a task knows its size, one when it ends."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._labels: dict[int, str] = {}

    def begin(self, label: str) -> int:
        task = len(self._labels)
        self._labels[task] = label
        return task

    def plan(self, task: int, total_bytes: int, total_items: int, unit: str) -> None:
        self._print(f"{self._labels[task]}: {total_items} {unit}, {size_in_words(total_bytes)}")

    def update(self, task: int, done_bytes: int, done_items: int) -> None:
        pass

    def end(self, task: int, ok: bool, text: str) -> None:
        outcome = "done" if ok else "FAILED"
        self._print(f"{self._labels[task]}: {outcome}" + (f": {text}" if text else ""))

    def close(self) -> None:
        pass

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


class RichProgress:
    """A live progress bar per task with bytes, items and speed (a TTY)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar = RichBar(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),  # KiB, MiB: as sizes.format_size writes them
            TextColumn("{task.fields[items]}"),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._tasks: dict[int, tuple[TaskID, str]] = {}
        self._units: dict[int, tuple[int, int, str]] = {}
        self._bar.start()

    def begin(self, label: str) -> int:
        task = len(self._tasks)
        self._tasks[task] = (self._bar.add_task(label, total=None, items=""), label)
        return task

    def plan(self, task: int, total_bytes: int, total_items: int, unit: str) -> None:
        self._units[task] = (total_bytes, total_items, unit)
        self._bar.update(self._tasks[task][0], total=total_bytes, items=f"0/{total_items} {unit}")

    def update(self, task: int, done_bytes: int, done_items: int) -> None:
        _, total, unit = self._units.get(task, (0, 0, ""))
        self._bar.update(
            self._tasks[task][0], completed=done_bytes, items=f"{done_items}/{total} {unit}"
        )

    def end(self, task: int, ok: bool, text: str) -> None:
        """Marks the bar done or FAILED; the reason is left to the summary."""
        task_id, label = self._tasks[task]
        total_bytes, total, unit = self._units.get(task, (0, 0, ""))
        if ok:
            self._bar.update(
                task_id,
                total=total_bytes,
                completed=total_bytes,
                items=f"{total}/{total} {unit}",
                description=f"{label} [green]done[/]",
            )
        else:
            # A known total stops the bar of a task that never learnt its size pulsing.
            self._bar.update(task_id, total=total_bytes or 1, description=f"{label} [red]FAILED[/]")
            self._bar.stop_task(task_id)

    def close(self) -> None:
        self._bar.stop()


def make_progress(stream: TextIO | None = None) -> Progress:
    """Bars on a terminal, plain lines otherwise."""
    console = Console(file=stream or sys.stderr)
    if console.is_terminal:
        return RichProgress(console)
    return PlainProgress(stream or sys.stderr)
