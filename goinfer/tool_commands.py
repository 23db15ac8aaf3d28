"""The operator tools `goinfer init`, `call`, `keygen`, `check`, `status` and `reload`: thin click wrappers.

The work is in goinfer.tools, imported when a command runs, so that `goinfer --help` and the
spawned worker processes (which import goinfer.cli) do not pay for it.

Exit statuses: 0 success; 1 the request or a check failed; 2 a usage or settings problem.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from goinfer.batch.command import batch_command
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
@click.option("--async", "as_job", is_flag=True,
              help="Submit an asynchronous job (POST /goinfer/jobs<API_PATH>): print its id on stderr, "
                   "poll it until it is done and print the data.")
@click.option("--no-wait", is_flag=True,
              help="With --async: print the job id (stdout) and exit without waiting.")
def call_command(api_path: str, data_text: str, url: str | None, sign_type: str, yaml_path: str,
                 app_id: str | None, as_job: bool, no_wait: bool) -> None:
    """Send one signed request to API_PATH and print the answer's data.

    API_PATH is a model's path, e.g. /api/echo.
    Credentials come from the settings file, so this checks a deployment end to end.
    An error answer prints `error <code>: <msg>` on stderr and exits 1.

    With --async the request is a job, which may run longer than MessageTimeout (up to
    Server.JobTimeout): `job <id>` is printed on stderr, and its answer once done, as for a
    synchronous call; a job that failed or expired prints its error. Ctrl-C stops waiting, not
    the job. With --no-wait only the job id is printed.
    """
    from goinfer.client import GoinferError
    from goinfer.settings import SettingsError, load_settings
    from goinfer.tools import ToolError, call, client_for, job_result, parse_data, submit_job

    if not api_path.startswith("/"):
        raise click.BadParameter(f"{api_path!r} must start with '/', e.g. /api/echo", param_hint="API_PATH")
    if no_wait and not as_job:
        raise click.BadParameter("--no-wait needs --async", param_hint="--no-wait")
    try:
        data = parse_data(data_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from None
    try:
        settings = load_settings(yaml_path)
        client = client_for(settings, url=url, sign_type=sign_type, app_id=app_id)  # type: ignore[arg-type]
        if not as_job:
            answer = call(client, api_path, data)
        else:
            handle = submit_job(client, api_path, data)
            if no_wait:
                click.echo(handle.job_id)
                return
            click.echo(f"job {handle.job_id}", err=True)
            answer = job_result(handle)
    except SettingsError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except ToolError as exc:
        _fail(str(exc), exc.status)
    except GoinferError as exc:
        click.echo(f"error {exc.code}: {exc.msg}", err=True)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt:
        _fail("stopped waiting; the job goes on", EXIT_FAILED)
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
    """Check a settings file: keys, published credentials, appIds, models, SM2 key, Redis.

    One line per check; exit status 0 only if all pass, 2 if the file is unusable or the tiers
    would refuse it (go-infer's published example credentials on a non-loopback API.Addr).
    Unknown keys and GOINFER_ variables fail here; the tiers only warn. Secrets are never printed.
    """
    from goinfer.logs import setup_logging
    from goinfer.settings import SettingsError
    from goinfer.tools import run_checks

    setup_logging(os.environ.get("GOINFER_LOG_LEVEL") or "WARNING")
    logging.getLogger("goinfer.settings").setLevel(logging.ERROR)  # unknown keys: FAIL lines below
    try:
        results = run_checks(yaml_path)
    except SettingsError as exc:
        click.echo(f"settings: FAIL: {exc}")
        sys.exit(EXIT_CONFIG)
    for result in results:
        click.echo(result.line())
    sys.exit(max((r.exit_status for r in results if not r.ok), default=0))


@click.command("reload")
@_yaml_option
def reload_command(yaml_path: str) -> None:
    """Make every dispatcher of this Redis roll its workers over to fresh processes.

    Each worker is replaced one at a time by a new process (never fewer than MaxWorkers serve
    meanwhile): changed model code is imported again and the version folders under each
    ModelBasePath are read again. A new worker that cannot load its models refuses the reload
    and the old workers serve on (the dispatcher's `reload_error` in GET /goinfer/status says why).

    Dispatchers look for a reload every Server.ModelPollS seconds; those with ModelPollS 0 take
    reloads only from SIGHUP (`kill -HUP <dispatcher pid>`, which reloads that one only).
    """
    from redis.exceptions import RedisError

    from goinfer.cluster_clients import slot_clients
    from goinfer.connections import refusal
    from goinfer.queue import DISPATCHERS_SET, RELOAD_KEY
    from goinfer.redis_address import describe_redis
    from goinfer.settings import SettingsError, load_settings

    try:
        settings = load_settings(yaml_path)
        nodes = slot_clients(settings.server, DISPATCHERS_SET, timeout_s=5.0)
    except SettingsError as exc:
        _fail(str(exc), EXIT_CONFIG)
    try:
        counter = nodes.client.incr(RELOAD_KEY)
    except (RedisError, OSError) as exc:
        refused = refusal(exc, settings.server)
        _fail(str(refused) if refused else f"redis at {describe_redis(settings.server)} does not answer: {exc}",
              EXIT_FAILED)
    finally:
        nodes.close()
    poll_s = settings.server.model_poll_s
    when = f"within Server.ModelPollS ({poll_s:g} s)" if poll_s else "(Server.ModelPollS is 0 here: send SIGHUP)"
    click.echo(f"reload {counter} requested: dispatchers roll their workers over {when}")


@click.command("status")
@click.option("--url", default=None, metavar="URL",
              help="The HTTP tier or nginx in front of it [default: http://<API.Addr or 127.0.0.1>:<API.Port>].")
@click.option("--json", "as_json", is_flag=True, help="Print the tier's GET /goinfer/status document as it is.")
@_yaml_option
def status_command(url: str | None, as_json: bool, yaml_path: str) -> None:
    """Show what serves this deployment, as one HTTP tier sees it.

    Per dispatcher: loading or serving, its workers, the model versions it serves, its devices,
    a rollover in progress and a refused version or reload; then each queue that waits for a
    dispatcher, loading or absent. Exit 1 when the tier cannot be reached.
    """
    from goinfer.settings import SettingsError, load_settings
    from goinfer.tools import ToolError, default_url, fetch_status, status_lines

    try:
        settings = load_settings(yaml_path)
        body = fetch_status(url or default_url(settings))
    except SettingsError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except ToolError as exc:
        _fail(str(exc), EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(body, indent=2, ensure_ascii=False, sort_keys=True))
        return
    for line in status_lines(body):
        click.echo(line)


@click.command("init")
@click.argument("folder", metavar="[DIR]", default=".", type=click.Path(file_okay=False))
def init_command(folder: str) -> None:
    """Write a new project into DIR (default: here): settings.yaml with fresh credentials, and mymodel.py.

    The settings have a new SM2 key pair, appId, appSecret and Redis password, and listen on
    127.0.0.1; mymodel.py is a working model to edit. The client's credentials are printed
    once, here. Existing files are never overwritten (exit status 2).
    """
    import shlex

    from goinfer.project_init import API_PATH, SETTINGS_NAME, InitError, init_project

    try:
        project = init_project(folder)
    except InitError as exc:
        _fail(str(exc), EXIT_CONFIG)
    creds = project.credentials
    program = _goinfer_command()
    cd = "" if os.path.abspath(folder) == os.getcwd() else f"cd {shlex.quote(folder)} && "
    data = shlex.quote('{"text": "hello"}')
    lines = [
        f"Wrote {project.settings_path} (fresh credentials, readable by you only) and {project.model_path}.",
        "",
        "Client credentials, shown this once (they are in the settings file; keep them secret):",
        f"  URL              {project.url}",
        f"  appId            {creds.app_id}",
        f"  appSecret        {creds.app_secret}    (signType SHA256 signs with it)",
        f"  SM2 private key  {creds.keypair.private_b64}    (signType SM2 signs with it)",
        f"  SM2 public key   {creds.keypair.public_hex_04}",
        "",
        "Start the service (models are imported from the working directory; Ctrl-C stops it):",
        f"  {cd}{program} up --yaml {SETTINGS_NAME}",
        "Call it, from another terminal:",
        f"  {cd}{program} call {API_PATH} --data {data} --yaml {SETTINGS_NAME}",
    ]
    click.echo("\n".join(lines))


def _goinfer_command() -> str:
    """How to run this goinfer again from another folder: `goinfer` when PATH finds this one."""
    import shlex
    import shutil

    script = os.path.realpath(sys.argv[0])
    if os.path.basename(script) != "goinfer" or not os.path.isfile(script):
        return f"{shlex.quote(sys.executable)} -m goinfer"  # python -m goinfer
    on_path = shutil.which("goinfer")
    if on_path and os.path.realpath(on_path) == script:
        return "goinfer"
    return shlex.quote(os.path.abspath(sys.argv[0]))


TOOL_COMMANDS = (init_command, call_command, keygen_command, check_command, status_command, reload_command,
                 batch_command)
