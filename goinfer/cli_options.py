"""What every goinfer command shares: the --yaml option and how a fatal problem is reported."""

from __future__ import annotations

import sys
from typing import NoReturn

import click

from goinfer.settings import DEFAULT_SETTINGS_PATH

EXIT_FAILED = 1
EXIT_CONFIG = 2

yaml_option = click.option(
    "--yaml",
    "yaml_path",
    default=DEFAULT_SETTINGS_PATH,
    show_default=True,
    metavar="PATH",
    help="The settings file (go-infer's settings.yaml schema); GOINFER_<SECTION>__<KEY> variables override it.",
)


def fatal(message: str, status: int = EXIT_CONFIG) -> NoReturn:
    """One line on stderr and an exit status; never a traceback."""
    click.echo(f"goinfer: error: {message}", err=True)
    sys.exit(status)
