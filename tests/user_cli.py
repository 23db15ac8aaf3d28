"""A user's own click program: registers a model and adds goinfer's commands (go-infer's main.go)."""

import click

import goinfer
import goinfer.cli

from sample_models import Greeter

goinfer.register(Greeter)


@click.group()
def cli() -> None:
    """My greeting service."""


goinfer.cli.add_commands(cli)

if __name__ == "__main__":
    cli()
