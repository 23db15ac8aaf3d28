"""The operator tools `goinfer call`, `goinfer keygen` and `goinfer check`: thin click wrappers.

The work is in goinfer.tools, imported when a command runs, so that `goinfer --help` and the
spawned worker processes (which import goinfer.cli) do not pay for it.

Exit statuses: 0 success; 1 the request or a check failed; 2 a usage or settings problem.
"""

from __future__ import annotations

import json
import os
import sys

import click

from goinfer.cli_options import EXIT_CONFIG, EXIT_FAILED
from goinfer.cli_options import fatal as _fail
from goinfer.cli_options import yaml_option as _yaml_option


@click.command("call")
@click.argument("api_path")
@click.option("--data", "data_text", default="{}", show_default=True, metavar="JSON",
              help="The request's data, a JSON object.")
@click.option("--url", default=None, metavar="URL",
              help="The HTTP tier or nginx in front of it [default: http://<API.Addr or 127.0.0.1>:<API.Port>].")
@click.option("--sign", "sign_type", type=click.Choice(["SM2", "SHA256", "plain"], case_sensitive=False), default="SM2",
              show_default=True, help="How to sign: SM2PrivateKey, the appSecret, or not at all.")
@_yaml_option
@click.option("--app-id", default=None, metavar="ID",
              help="The appId to sign as [default: the first API.AppIdSecret entry].")
def call_command(api_path: str, data_text: str, url: str | None, sign_type: str, yaml_path: str,
                 app_id: str | None) -> None:
    """Send one signed request to API_PATH and print the answer's data.

    API_PATH is a model's path, e.g. /api/echo.
    Credentials come from the settings file, so this checks a deployment end to end.
    An error answer prints `error <code>: <msg>` on stderr and exits 1.
    """
    from goinfer.client import GoinferError
    from goinfer.settings import SettingsError, load_settings
    from goinfer.tools import ToolError, call, client_for, parse_data

    if not api_path.startswith("/"):
        raise click.BadParameter(f"{api_path!r} must start with '/', e.g. /api/echo", param_hint="API_PATH")
    try:
        data = parse_data(data_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None
    try:
        settings = load_settings(yaml_path)
        client = client_for(settings, url=url, sign_type=sign_type, app_id=app_id)  # type: ignore[arg-type]
        answer = call(client, api_path, data)
    except SettingsError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except ToolError as exc:
        _fail(str(exc), exc.status)
    except GoinferError as exc:
        click.echo(f"error {exc.code}: {exc.msg}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(json.dumps(answer, indent=2, ensure_ascii=False, sort_keys=True))


@click.command("keygen")
def keygen_command() -> None:
    """Print a new SM2 key pair for API.SM2PrivateKey and for SM2-signing clients."""
    from goinfer.tools import new_keypair

    pair = new_keypair()
    click.echo(f"SM2PrivateKey: {pair.private_b64}")
    click.echo(f"public key (x||y): {pair.public_hex}")
    click.echo(f"public key (04||x||y): {pair.public_hex_04}")
    click.echo("# SM2PrivateKey goes under API: in every HTTP tier's settings (the server derives the "
               "public key from it to verify) and, kept secret, to clients that sign with SM2; "
               "go-infer's gmssl client also takes the public key (x||y).")


@click.command("check")
@_yaml_option
def check_command(yaml_path: str) -> None:
    """Check a settings file: the file, its appIds, models, SM2 key and whether Redis answers.

    One line per check; exit status 0 only if all pass (2 if the file itself is unusable).
    Secrets are never printed.
    """
    from goinfer.logs import setup_logging
    from goinfer.settings import SettingsError
    from goinfer.tools import run_checks

    setup_logging(os.environ.get("GOINFER_LOG_LEVEL") or "WARNING")  # unknown keys are named
    try:
        results = run_checks(yaml_path)
    except SettingsError as exc:
        click.echo(f"settings: FAIL: {exc}")
        sys.exit(EXIT_CONFIG)
    for result in results:
        click.echo(result.line())
    sys.exit(0 if all(r.ok for r in results) else EXIT_FAILED)


TOOL_COMMANDS = (call_command, keygen_command, check_command)
