"""The `goinfer batch` command: arguments, settings and models in; exit status out.

Exit statuses: 0 every input row is in the output (errors included); 1 the run stopped early
(rerun it to continue); 2 a usage, settings or input problem, told in one line.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from goinfer.cli_options import EXIT_CONFIG, EXIT_FAILED
from goinfer.cli_options import fatal as _fail
from goinfer.cli_options import yaml_option as _yaml_option

if TYPE_CHECKING:
    from goinfer.batch.run import Sender
    from goinfer.settings import Settings

DEFAULT_CONCURRENCY = 64
DEFAULT_RETRIES = 3


@click.command("batch")
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("--api", "api_path", required=True, metavar="PATH", help="The model's api path, e.g. /api/embedding.")
@click.option("--output", "output_path", required=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="JSON Lines, one line per input row, in input order; an existing one is resumed.")
@click.option("--errors", "errors_path", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Write failed rows here instead of to --output.")
@click.option("--format", "input_format", type=click.Choice(["jsonl", "csv", "parquet"]), default=None,
              help="The input's format [default: from its extension].")
@click.option("--url", default=None, metavar="URL",
              help="Send through the HTTP API at URL as a signed client, instead of straight to Redis.")
@click.option("--sign", "sign_type", type=click.Choice(["SM2", "SHA256", "plain"], case_sensitive=False),
              default="SHA256", show_default=True, help="With --url: how to sign.")
@click.option("--app-id", default=None, metavar="ID",
              help="With --url: the appId to sign as [default: the first API.AppIdSecret entry].")
@click.option("--concurrency", type=click.IntRange(1, 100000), default=DEFAULT_CONCURRENCY, show_default=True,
              help="Rows in flight at most.")
@click.option("--retries", type=click.IntRange(0, 100), default=DEFAULT_RETRIES, show_default=True,
              help="Tries more for a row that fails transiently (QueueFull, SendMsgFail, QueueTimeout, "
                   "connection errors), with back-off.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1, None), default=None, metavar="S",
              help="Direct mode: a row not answered within S seconds is tried again "
                   "[default: Server.JobTimeout].")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default=None,
              help="Direct mode: the lane rows go on [default: low, unless the model's Priority says otherwise].")
@click.option("--no-progress", is_flag=True, help="No progress bar (the summary is still printed).")
@_yaml_option
def batch_command(input_path: str, api_path: str, output_path: str, errors_path: str | None,
                  input_format: str | None, url: str | None, sign_type: str, app_id: str | None,
                  concurrency: int, retries: int, timeout_s: float | None, priority: str | None,
                  no_progress: bool, yaml_path: str) -> None:
    """Run every row of INPUT through the model at --api and write one output line per row.

    INPUT is JSON Lines (each line an object: its `data`, or the whole line, is the request's
    data; an `id` names the row), CSV (a header line; cells are strings) or Parquet (needs
    pyarrow). By default rows go straight to Redis on the low-priority lane, through the same
    queues and dispatchers as live requests; --url sends them through the HTTP API instead.
    Each output line holds the row number, the row's id, and `result` or `error`. Killed and
    rerun with the same arguments, a run continues where it stopped.
    """
    import asyncio

    from goinfer.batch.inputs import InputError, count_rows, detect_format, read_rows
    from goinfer.batch.outputs import OutputError, OutputWriter
    from goinfer.batch.run import BatchRun, Summary, progress_bar
    from goinfer.logs import setup_logging
    from goinfer.settings import SettingsError, load_settings

    if not api_path.startswith("/"):
        raise click.BadParameter(f"{api_path!r} must start with '/', e.g. /api/echo", param_hint="--api")
    if url is not None and (priority is not None or timeout_s is not None):
        raise click.BadParameter("--priority and --timeout apply to direct mode, not with --url "
                                 "(the HTTP tier decides; see API.AppIdPriority)", param_hint="--url")
    setup_logging(os.environ.get("GOINFER_LOG_LEVEL") or "WARNING")
    try:
        settings = load_settings(yaml_path)
        fmt = detect_format(input_path, input_format)
        total = count_rows(input_path, fmt) if os.path.isfile(input_path) else 0
        rows = read_rows(input_path, fmt)
        sender = _sender(settings, api_path, url, sign_type, app_id, priority, timeout_s)
        arguments = {"input": os.path.abspath(input_path), "format": fmt, "api": api_path,
                     "errors": os.path.abspath(errors_path) if errors_path else None}
        writer = OutputWriter(output_path, errors_path, arguments)
        skipped = writer.open()
    except (SettingsError, InputError, OutputError) as exc:
        _fail(str(exc), EXIT_CONFIG)
    summary = Summary(total=total, skipped=skipped)
    progress = progress_bar(total, skipped) if not no_progress else _NoProgress()
    error = settings.error("ApiEntryFail")
    run = BatchRun(rows, writer, sender, summary, concurrency, retries, progress, (error.code, error.msg))
    try:
        summary = asyncio.run(run.run())
    except InputError as exc:  # a file that turns unreadable halfway (e.g. a broken CSV line)
        summary.stopped = str(exc)
    finally:
        progress.close()
        writer.close()
    for line in summary.lines():
        click.echo(line)
    sys.exit(0 if summary.complete else EXIT_FAILED)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _sender(settings: Settings, api_path: str, url: str | None, sign_type: str, app_id: str | None,
            priority: str | None, timeout_s: float | None) -> Sender:
    """The direct sender (the model imported here, as the HTTP tier does) or the signed HTTP one."""
    from goinfer.client import AsyncClient
    from goinfer.models.registry import ModelError, instantiate, resolve_models
    from goinfer.queue import PRIORITY_LOW
    from goinfer.tools import ToolError, client_for

    if url is not None:
        try:
            client = client_for(settings, url=url, sign_type=sign_type.upper() if sign_type != "plain" else "plain",  # type: ignore[arg-type]
                                app_id=app_id)
        except ToolError as exc:
            _fail(str(exc), exc.status)
        from goinfer.batch.senders import HttpSender

        signing = AsyncClient(client.url, client.app_id, settings.api.app_id_secret.get(client.app_id, ""),
                              sign_type=client.sign_type, sm2_private_key=settings.api.sm2_private_key or None,
                              timeout=client.timeout)
        return HttpSender(settings, signing, api_path)
    try:
        registry = resolve_models(settings.models)
    except ModelError as exc:
        _fail(f"{settings.path}: Models: {exc}", EXIT_CONFIG)
    classes = [cls for cls in registry.classes if cls.api_path == api_path]
    if not classes:
        served = ", ".join(cls.api_path for cls in registry.classes)
        _fail(f"no model serves {api_path} (these do: {served})", EXIT_CONFIG)
    model = instantiate(classes, settings)[api_path]
    from goinfer.batch.senders import DirectSender

    lane = priority or settings.priority_of(PRIORITY_LOW, "", model.config)
    return DirectSender(settings, model, lane, timeout_s if timeout_s is not None else settings.server.job_timeout)
