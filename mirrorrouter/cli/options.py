"""What every subcommand shares on its command line: ``--config`` (found by
config/discovery.py when not given), and the type of the parser's subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeAlias

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: $MIRRORROUTER_CONFIG, ./mirrors.toml, "
        "/etc/mirrorrouter/mirrors.toml)",
    )
