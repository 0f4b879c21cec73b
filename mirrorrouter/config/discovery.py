"""Where the configuration file is: one rule for ``serve``, every other subcommand and the
factory uvicorn's workers call (``app.app_from_environment``).

In order: the file named on the command line (``--config``), ``$MIRRORROUTER_CONFIG``,
``./mirrors.toml`` when it exists, ``/etc/mirrorrouter/mirrors.toml`` when it exists, and
otherwise ``./mirrors.toml`` (whose absence the loader then reports). ``serve`` resolves the
file once and exports it as ``$MIRRORROUTER_CONFIG``, so every worker reads the same one.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_ENV = "MIRRORROUTER_CONFIG"
DEFAULT_CONFIG_PATHS = (Path("mirrors.toml"), Path("/etc/mirrorrouter/mirrors.toml"))


def find_config(given: Path | None = None) -> Path:
    """The configuration file to read: ``given`` (``--config``) or the default (above)."""
    if given is not None:
        return given
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    return next((p for p in DEFAULT_CONFIG_PATHS if p.exists()), DEFAULT_CONFIG_PATHS[0])
