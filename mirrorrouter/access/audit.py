"""The audit log: one JSON line per content request (manifest or blob GET).

Fields: time, client address, user, canonical reference, digest, upstream, mirror (the one
that served a miss), cache result, bytes. Credentials and tokens never appear: nothing from
a request's headers is written but what is listed here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class AuditLog:
    """Appends JSON lines to a file shared by every worker (O_APPEND keeps lines whole)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def record(self, **fields: Any) -> None:
        if self._fd is None:
            return
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
        os.write(self._fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
