"""The `goinfer` commands; thin wrappers that load settings and call the library.

`http_command`, `server_command` and `up_command` are plain click commands, so a user can add
them to their own click group next to their models (go-infer's `rootCmd.AddCommand(cli.HttpCmd)`):

    import click, goinfer, goinfer.cli
    from mymodels import Bert

    goinfer.register(Bert)

    @click.group()
    def cli(): ...

    goinfer.cli.add_commands(cli)
"""

from __future__ import annotations

import logging
import sys

import click

from goinfer import __version__
from goinfer.cli_options import fatal as _fatal
from goinfer.cli_options import yaml_option
from goinfer.logs import setup_logging
from goinfer.models.registry import ModelError, ModelRegistry, default_registry, resolve_models
from goinfer.published import published_verdict
from goinfer.settings import Settings, SettingsError, load_settings
from goinfer.tool_commands import TOOL_COMMANDS

log = logging.getLogger("goinfer.cli")


def _load(yaml_path: str) -> Settings:
    setup_logging()
    try:
        return load_settings(yaml_path)
    except SettingsError as exc:
        _fatal(str(exc))


def _refuse_published(settings: Settings) -> None:
    """Published example credentials: one warning on loopback, exit status 2 anywhere else."""
    verdict = published_verdict(settings)
    if verdict.refused:
        _fatal(verdict.message)
    if verdict.warns:
        log.warning("%s", verdict.message)


def _models(settings: Settings) -> ModelRegistry:
    try:
        return resolve_models(settings.models)
    except ModelError as exc:
        _fatal(f"{settings.path}: Models: {exc}")


def _model_paths(settings: Settings) -> list[str]:
    """Import paths for worker processes, without importing model code in this process."""
    paths = default_registry.import_paths()
    paths += [p for p in settings.models if p not in paths]
    if not paths:
        _fatal(f"{settings.path}: Models: no models to serve: list them under 'Models:' "
               "or register them with goinfer.register()")
    return paths


@click.command("http")
@yaml_option
@click.option("--workers", type=click.IntRange(1, 256), default=None, metavar="N",
              help="HTTP processes sharing the port (SO_REUSEPORT). Default: API.HttpWorkers, 1.")
def http_command(yaml_path: str, workers: int | None) -> None:
    """Start the HTTP tier: check signed requests, queue them, answer in go-infer's envelope.

    Listens on API.Addr:API.Port. Stops cleanly on SIGTERM or Ctrl-C, answering the requests
    already in flight first. One process uses one core; give it --workers to use more.
    Refuses go-infer's published example credentials on a non-loopback API.Addr.
    """
    from goinfer.http.server import run_http, run_http_processes

    settings = _load(yaml_path)
    _refuse_published(settings)
    registry = _models(settings)
    count = workers or settings.api.http_workers
    try:
        if count > 1:
            sys.exit(run_http_processes(settings, registry.import_paths(), count))
        run_http(settings, registry)
    except SettingsError as exc:  # among others: API.Port held by another program
        _fatal(str(exc))


@click.command("server")
@click.argument("queue", metavar="N", type=int)
@yaml_option
def server_command(queue: int, yaml_path: str) -> None:
    """Start a dispatcher for queue N: MaxWorkers worker processes run the models.

    N is in [0, Server.RequestQueueAmount). Several dispatchers may serve the same N, on one
    machine or many; each request is executed once. Stops cleanly on SIGTERM or Ctrl-C.
    """
    from goinfer.dispatcher.supervisor import run_dispatcher

    settings = _load(yaml_path)
    amount = settings.server.request_queue_amount
    if not 0 <= queue < amount:
        raise click.BadParameter(
            f"{queue} is not a queue number: Server.RequestQueueAmount is {amount}, so N is in [0, {amount})",
            param_hint="N",
        )
    sys.exit(run_dispatcher(settings, queue, _model_paths(settings)))


@click.command("up")
@yaml_option
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Keep the private redis-server's data in DIR (created if missing) as an append-only file, "
                   "fsynced every second: if that Redis dies, it comes back with the requests queued in it, "
                   "and the next `up --data-dir DIR` starts from the same data. Default: none, nothing is kept.")
def up_command(yaml_path: str, data_dir: str | None) -> None:
    """Run everything on this machine: one dispatcher per queue and the HTTP tier.

    If the settings' Redis is on this machine and does not answer, a private redis-server is
    started first (the installed one, or the one of the `goinfer[redis]` extra), and started
    again if it dies. Without --data-dir it persists nothing: its files are in a temporary folder
    removed when it stops, and the requests queued in it are lost (answered QueueTimeout) when it
    dies. With --data-dir it keeps its data there. A Redis that already answers is used as it is
    (--data-dir is then ignored, with a warning). Ctrl-C or SIGTERM stops everything that was started.
    Refuses go-infer's published example credentials on a non-loopback API.Addr.
    """
    from goinfer.up import run_up

    settings = _load(yaml_path)
    _refuse_published(settings)
    _models(settings)  # refuse a broken model list before starting anything
    sys.exit(run_up(settings, _model_paths(settings), data_dir))


def add_commands(group: click.Group) -> click.Group:
    """Add goinfer's `http`, `server` and `up` commands to your own click group."""
    for command in (http_command, server_command, up_command):
        group.add_command(command)
    return group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="goinfer")
def main() -> None:
    """goinfer: serve models behind a signed HTTP API, with Redis between the tiers.

    Start a project with `goinfer init DIR`. Run `goinfer up` on one machine, or `goinfer http`
    and `goinfer server N` on as many machines as you need, all pointing at one Redis.
    """


add_commands(main)
for _tool in TOOL_COMMANDS:  # operator tools: init, call, keygen, check
    main.add_command(_tool)

if __name__ == "__main__":
    main()
