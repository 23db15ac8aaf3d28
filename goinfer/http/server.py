"""Start-up of one HTTP tier process: load models and keys, then serve until SIGTERM or Ctrl-C.

A settings problem (a bad SM2 key, Redis refusing RedisPasswd, at start or later) ends the tier
with SettingsError, which the commands turn into one line and exit status 2; with `--workers`,
a process that exits so stops them all instead of being restarted forever.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from redis.exceptions import RedisError

from goinfer.cli_options import EXIT_CONFIG, fatal
from goinfer.connections import RedisRefused, refusal, sync_client
from goinfer.crypto.sm2 import SM2Verifier, public_key_from_private_b64
from goinfer.http.app import QUEUE_CLIENT, TIER_STATE, create_app
from goinfer.http.metrics import MULTIPROC_ENV
from goinfer.http.queue_client import QueueClient
from goinfer.http.signing import SignatureChecker
from goinfer.logs import setup_logging
from goinfer.models.base import NOAPI_PREFIX
from goinfer.models.registry import ModelRegistry, instantiate
from goinfer.processes import StopSignals, exit_code, start_child, stop_processes
from goinfer.settings import Settings, SettingsError

log = logging.getLogger("goinfer.http")

# Requests in flight get this long to finish after SIGTERM before their connections close.
SHUTDOWN_GRACE_S = 30.0
KEEPALIVE_TIMEOUT_S = 75.0


def sm2_verifier_for(settings: Settings) -> SM2Verifier | None:
    """The verifier for the configured key pair; None (SM2 refused) when no key is configured."""
    key = settings.api.sm2_private_key
    if not key:
        log.warning("API.SM2PrivateKey is not set: requests signed with SM2 will be refused")
        return None
    try:
        return SM2Verifier(public_key_from_private_b64(key))
    except ValueError as exc:
        raise SettingsError(settings.path, "API.SM2PrivateKey", str(exc)) from None


def build_app(settings: Settings, registry: ModelRegistry,
              clock: Callable[[], float] = time.time) -> web.Application:
    """The app of one HTTP process; `clock` is what request timestamps are checked against."""
    models = instantiate(registry.classes, settings)
    checker = SignatureChecker(settings.api, sm2_verifier_for(settings), clock)
    return create_app(settings, models, checker, QueueClient(settings.server))


class ClientFaultFilter(logging.Filter):
    """aiohttp logs a full traceback at ERROR for every malformed request and every client that
    hangs up mid-body, so anyone could fill the log; those become one DEBUG line. Errors of the
    server itself still reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (HttpProcessingError, RequestPayloadError, ConnectionError)):
            log.debug("client fault: %s: %s", type(error).__name__, error)
            return False
        return True


def run_http(settings: Settings, registry: ModelRegistry, reuse_port: bool = False) -> None:
    """Serve the API on the settings' Addr:Port; returns after a clean shutdown.

    Raises SettingsError when the settings cannot work: among others when API.Addr:API.Port cannot
    be listened on, or Redis refuses its credentials, at start or later (the tier then stops at
    once: retrying cannot help).
    """
    _use_uvloop()
    logging.getLogger("aiohttp.server").addFilter(ClientFaultFilter())
    try:
        asyncio.run(_serve(settings, build_app(settings, registry), registry, reuse_port))
    except RedisRefused as exc:
        raise SettingsError(settings.path, None, str(exc)) from None


def check_redis_credentials(settings: Settings) -> None:
    """Raise SettingsError if Redis refuses the configured credentials; an unreachable Redis passes
    (the tier serves SendMsgFail until it is back), and so does one that stays silent past
    Server.RedisTimeoutS (a black-holed address must not hold up the start)."""
    client = sync_client(settings.server, timeout_s=settings.server.redis_timeout_s)
    try:
        client.ping()
    except RedisError as exc:
        refused = refusal(exc, settings.server)
        if refused is not None:
            raise SettingsError(settings.path, None, str(refused)) from None
    finally:
        client.close()


async def _serve(settings: Settings, app: web.Application, registry: ModelRegistry, reuse_port: bool) -> None:
    """Serve until SIGTERM/SIGINT, then drain: answer with `Connection: close` for
    ShutdownDrainS (longer than a proxy's idle keep-alive, so no idle connection is left to
    race with), stop listening, and let the requests in flight finish."""
    api = settings.api
    grace = min(SHUTDOWN_GRACE_S, settings.server.message_timeout + 1)
    # keepalive_timeout: run_app's 75 s (AppRunner's own default is an hour) bounds idle connections.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=grace,
                           keepalive_timeout=KEEPALIVE_TIMEOUT_S)
    await runner.setup()  # starts the queue client: RedisRefused if Redis refuses our credentials
    queue = app[QUEUE_CLIENT]
    try:
        site = web.TCPSite(runner, api.addr, api.port, reuse_port=reuse_port or None, backlog=1024,
                           shutdown_timeout=grace)
        try:
            await site.start()
        except OSError as exc:
            raise cannot_listen(settings, exc) from None
        routes = [m.api_path for m in registry.classes if not m.api_path.startswith(NOAPI_PREFIX)]
        log.info("HTTP tier on %s:%d serving %s", api.addr, api.port, ", ".join(routes))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        queue.when_refused(stop.set)
        await stop.wait()
        app[TIER_STATE].draining = True
        # Refused credentials: no drain, every request would get SendMsgFail anyway.
        if api.shutdown_drain_s > 0 and queue.refused is None:
            log.info("stopping: draining connections for %.1fs", api.shutdown_drain_s)
            await asyncio.sleep(api.shutdown_drain_s)
    finally:
        await runner.cleanup()
    if queue.refused is not None:
        raise queue.refused
    log.info("HTTP tier stopped")


def refuse_a_port_in_use(settings: Settings) -> None:
    """Raise SettingsError (cannot_listen) if something already listens on API.Addr:API.Port.

    The --workers processes bind with SO_REUSEPORT, which also lets them join a listener that
    another `goinfer http --workers` left there (a stale one, with other settings or models): the
    kernel would then hand that one half the connections, unnoticed. A plain bind first refuses
    the port as a single process does. SO_REUSEADDR keeps a previous run's TIME_WAIT connections
    from counting as a listener."""
    api = settings.api
    try:
        addresses = socket.getaddrinfo(api.addr or None, api.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise cannot_listen(settings, exc) from None
    for family, kind, protocol, _, address in addresses:
        try:
            probe = socket.socket(family, kind, protocol)
        except OSError:
            continue  # a family this host lacks (IPv6): asyncio skips it too
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds it
            try:
                probe.bind(address)
            except OSError as exc:
                raise cannot_listen(settings, exc) from None


def cannot_listen(settings: Settings, exc: OSError) -> SettingsError:
    """A port another program holds (or an address this machine lacks) is the operator's to fix:
    one line naming the setting, the exit status of a settings problem, and no restart (under
    --workers or `goinfer up`) that would fail the same way forever."""
    api = settings.api
    # uvloop's messages repeat the address; getaddrinfo's errno is not an errno
    if exc.errno and not isinstance(exc, socket.gaierror):
        reason = os.strerror(exc.errno).lower()
    else:
        reason = exc.strerror or str(exc)
    key = "API.Port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "API.Addr"
    return SettingsError(settings.path, key, f"cannot listen on {api.addr}:{api.port}: {reason}")


def _http_process_main(settings: Settings, model_paths: list[str]) -> None:
    setup_logging()
    registry = ModelRegistry()
    registry.extend_from_paths(model_paths)
    try:
        run_http(settings, registry, reuse_port=True)
    except SettingsError as exc:
        fatal(str(exc))  # exit status EXIT_CONFIG: the parent stops instead of restarting it


def run_http_processes(settings: Settings, model_paths: Sequence[str], count: int) -> int:
    """Serve with `count` processes sharing the port (SO_REUSEPORT): the HTTP tier on every core.

    Each process has its own reply list, so replies never cross processes. A process that dies
    is restarted, except one that exits with EXIT_CONFIG (a settings problem, such as Redis
    refusing RedisPasswd): restarting cannot fix that, so all stop and this returns EXIT_CONFIG.
    SIGTERM or Ctrl-C stops them all after they answer what is in flight. A scrape of /metrics
    reaches any one process, so they share their metrics through a private
    PROMETHEUS_MULTIPROC_DIR (unless one is set already) and each one shows the sum.

    Raises SettingsError, before starting any process, if Redis refuses the credentials or
    something already listens on the port.
    """
    check_redis_credentials(settings)  # one line now, rather than one per process
    refuse_a_port_in_use(settings)
    context = multiprocessing.get_context("spawn")
    metrics_folder = None
    if not os.environ.get(MULTIPROC_ENV):
        metrics_folder = tempfile.mkdtemp(prefix="goinfer-http-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_folder
    stop = StopSignals()

    def start(index: int) -> BaseProcess:
        process = context.Process(target=_http_process_main, args=(settings, list(model_paths)),
                                  name=f"goinfer-http-{index}")
        start_child(process)
        return process

    processes = {index: start(index) for index in range(count)}
    log.info("HTTP tier: %d processes on port %d", count, settings.api.port)
    status = 0
    while not stop.requested and status == 0:
        by_sentinel = {p.sentinel: i for i, p in processes.items()}
        for sentinel in wait(list(by_sentinel), timeout=0.5):
            if stop.requested:
                break
            assert isinstance(sentinel, int)  # wait() returns the sentinels it was given
            index = by_sentinel[sentinel]
            code = exit_code(processes[index])
            _forget_metrics_of(processes[index].pid)
            if code == EXIT_CONFIG:
                log.error("HTTP process %d (pid %s) stopped on a settings problem; stopping all",
                          index, processes[index].pid)
                status = EXIT_CONFIG
                break
            log.error("HTTP process %d (pid %s) exited with code %s; restarting it", index, processes[index].pid, code)
            time.sleep(0.5)  # a process that cannot start should not spin
            processes[index] = start(index)
    stop_processes(processes.values(), SHUTDOWN_GRACE_S + settings.api.shutdown_drain_s + 5)
    if metrics_folder is not None:
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(metrics_folder, ignore_errors=True)
    log.info("HTTP tier stopped")
    return status


def _forget_metrics_of(pid: int | None) -> None:
    """A dead process's live gauges (in flight) must not count; its counters still do."""
    from prometheus_client import multiprocess

    if pid is not None:
        multiprocess.mark_process_dead(pid)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        log.info("uvloop not installed; using asyncio's default event loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
