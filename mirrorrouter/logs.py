"""Logging: JSON lines for machines, readable lines in a terminal.

``log_config`` is handed to uvicorn, so uvicorn's own messages and mirrorrouter's share one
format. With ``server.access_log = true`` the gateway writes one access line per request on
the ``mirrorrouter.access`` logger (uvicorn's own access line is off): request id, method,
path, status, route, upstream, mirror, cache result, duration and bytes. Credentials never
appear: nothing from a request's headers is logged.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

ACCESS_LOGGER = "mirrorrouter.access"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the process (with several
    workers: which one wrote it), and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


class HumanFormatter(logging.Formatter):
    """``12:00:01 INFO  mirrorrouter.access GET /v2/... 200  route=ns upstream=docker.io``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += "  " + " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, ""))
        return text


def log_config(level: str, json_lines: bool | None = None) -> dict[str, Any]:
    """A logging dict config for uvicorn: JSON unless stderr is a terminal."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    formatter = (
        "mirrorrouter.logs.JsonFormatter" if json_lines else "mirrorrouter.logs.HumanFormatter"
    )
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": {"()": formatter}},
        "handlers": {"main": handler},
        "loggers": {
            "mirrorrouter": {"handlers": ["main"], "level": upper, "propagate": False},
            "uvicorn": {"handlers": ["main"], "level": upper, "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def access(method: str, path: str, status: int, **fields: Any) -> None:
    """One access line (only when the access log is on: callers check ``access_enabled``)."""
    logging.getLogger(ACCESS_LOGGER).info(
        "%s %s %s", method, path, status, extra={"fields": {"status": status, **fields}}
    )
