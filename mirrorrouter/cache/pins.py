"""Pins: images eviction never removes.

``[cache] pins`` in the config and the runtime pins of ``mirrorrouter cache pin`` (kept in
``<cache directory>/pins.json``) are glob patterns over canonical ``name:tag`` (and
``name@digest`` for a manifest by digest). A pinned image is never evicted, nor is
anything it reaches, also when another image shares it; a pinned image stays complete
(images.py marks what pins reach, eviction.py skips it).
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mirrorrouter.config import Settings
from mirrorrouter.config.model import pin_pattern_problem
from mirrorrouter.errors import MirrorRouterError
from mirrorrouter.reference import Digest

PINS_FILE = "pins.json"


class PinsError(MirrorRouterError):
    """The runtime pins file cannot be read or written; nothing is evicted meanwhile."""


@dataclass(frozen=True, slots=True)
class Pins:
    """Pin patterns from the config and from ``pins.json``."""

    config: tuple[str, ...] = ()
    runtime: tuple[str, ...] = ()

    @property
    def patterns(self) -> tuple[str, ...]:
        return self.config + tuple(p for p in self.runtime if p not in self.config)

    def match_tag(self, name: str, tag: str) -> str | None:
        """The first pattern pinning ``name:tag``, or None."""
        return self._match(f"{name}:{tag}")

    def match_digest(self, name: str, digest: Digest) -> str | None:
        """The first pattern pinning ``name@digest``, or None."""
        return self._match(f"{name}@{digest}")

    def _match(self, text: str) -> str | None:
        return next((p for p in self.patterns if fnmatch.fnmatchcase(text, p)), None)


def pins_path(settings: Settings) -> Path:
    return settings.cache.directory / PINS_FILE


def load_pins(settings: Settings) -> Pins:
    """Config pins and the runtime pins; raises ``PinsError`` for an unreadable pins.json."""
    return Pins(settings.cache.pins, tuple(_read_runtime_pins(pins_path(settings))))


def _read_runtime_pins(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise PinsError(f"{path}: cannot read the runtime pins: {exc}") from exc
    pins = data.get("pins") if isinstance(data, dict) else None
    if not isinstance(pins, list) or not all(isinstance(p, str) for p in pins):
        raise PinsError(f'{path}: expected {{"pins": [patterns]}}')
    return pins


def change_runtime_pins(
    settings: Settings, *, add: str | None = None, remove: str | None = None
) -> bool:
    """Add or remove one runtime pin; False when there was nothing to change."""
    path = pins_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.with_name(PINS_FILE + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pin and unpin may run at once
        pins = _read_runtime_pins(path)
        if add is not None and add not in pins:
            pins.append(add)
        elif remove is not None and remove in pins:
            pins.remove(remove)
        else:
            return False
        temp = path.with_name(f".{PINS_FILE}.{os.getpid()}")
        temp.write_text(json.dumps({"pins": pins}, indent=2) + "\n", encoding="utf-8")
        os.replace(temp, path)
        return True
    finally:
        os.close(lock)


def check_pin(pattern: str) -> str | None:
    """What is wrong with a pin pattern, or None (see config.model.pin_pattern_problem)."""
    problem = pin_pattern_problem(pattern)
    return None if problem is None else f"expected {problem}"
