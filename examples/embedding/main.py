"""The embedding service as a user's own click program (go-infer's examples/main.go pattern).

    python -m examples.embedding.main up --yaml examples/embedding/settings.yaml
    python -m examples.embedding.main server 0 --yaml examples/embedding/settings.yaml
    python -m examples.embedding.main http --yaml examples/embedding/settings.yaml
    python -m examples.embedding.main export          # write the SavedModel cache first (faster start)
"""

from __future__ import annotations

import os

import click

# TensorFlow's start-up chatter (CPU features, oneDNN) is not useful in service logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import goinfer  # noqa: E402
import goinfer.cli  # noqa: E402
from examples.embedding.model import Embedding  # noqa: E402

goinfer.register(Embedding)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(goinfer.__version__, prog_name="goinfer-embedding")
def cli() -> None:
    """all-MiniLM-L6-v2 sentence embeddings behind goinfer's signed API."""


@cli.command("export")
@click.option("--out", default=None, metavar="DIR", help="Where to write (default: the cache folder).")
def export_command(out: str | None) -> None:
    """Write the encoder as a SavedModel that workers load instead of rebuilding it."""
    from examples.embedding.encoder import default_cache_dir
    from examples.embedding.export import export_saved_model

    click.echo(export_saved_model(out or str(default_cache_dir())))


goinfer.cli.add_commands(cli)

if __name__ == "__main__":
    cli()
