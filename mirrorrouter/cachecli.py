"""Subcommands of `mirrorrouter` registered by this module (see cli.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

ConfigOption = Callable[[argparse.ArgumentParser], None]


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], config_option: ConfigOption
) -> None:
    """Add this module's subcommands to the `mirrorrouter` parser."""
