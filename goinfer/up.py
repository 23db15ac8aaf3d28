"""`goinfer up`: the whole service on one machine, Redis included when none is running.

Children are spawned processes running the same functions as `goinfer http` and
`goinfer server N`, so single-machine mode behaves exactly like a distributed deployment.

The private Redis is started again if it dies, since the tiers wait an outage out but nothing
else would end it. It is throwaway unless the user names a data folder (`--data-dir`): then it
keeps an append-only file there, as a deployment's durable Redis would, so a Redis that died comes
back with the requests queued in it (served if within their MessageTimeout, while their HTTP tier
still waits), and the next `up` with that folder starts from the same data.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

import redis
from redis.exceptions import RedisError

from goinfer.cli_options import EXIT_CONFIG, EXIT_FAILED, fatal
from goinfer.connections import RedisRefused, refusal, sync_client
from goinfer.logs import setup_logging
from goinfer.processes import StopSignals, exit_code, start_child, stop_processes
from goinfer.redis_address import describe_redis, redis_address, redis_url
from goinfer.redis_server import (
    INSTALL_HINT,
    DataFolderError,
    RedisServer,
    RedisServerError,
    find_redis_server,
    start_redis_server,
)
from goinfer.settings import Settings, SettingsError
from goinfer.tools import default_url

log = logging.getLogger("goinfer.up")

REDIS_START_TIMEOUT_S = 10.0
CHILD_STOP_GRACE_S = 40.0
# A private redis-server that dies is started again, on the same port and data folder; one that
# dies more often than this within the window will not stay up, and `up` stops.
REDIS_RESTART_LIMIT = 3
REDIS_RESTART_WINDOW_S = 60.0
# Until the service is ready, what it waits for: a line rewritten on a terminal, else logged.
PROGRESS_TTY_S = 0.5
PROGRESS_LOG_S = 2.0
PROBE_TIMEOUT_S = 1.0


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def _bind_address(host: str) -> str:
    """Where the private server listens: the settings' loopback address if it is one, else 127.0.0.1."""
    try:
        return host if ipaddress.ip_address(host).is_loopback else "127.0.0.1"
    except ValueError:
        return "127.0.0.1"


def ensure_redis(settings: Settings, data_dir: str | os.PathLike[str] | None = None) -> RedisServer | None:
    """Start a private Redis if the configured one is local and silent, persisting to `data_dir`
    when given; raise RuntimeError if impossible, RedisRefused if the Redis that answers refuses
    the credentials."""
    client: redis.Redis = sync_client(settings.server)
    try:
        client.ping()
        if data_dir is not None:
            # Its persistence is its own configuration's: say so rather than let the user believe
            # the queue is kept in data_dir.
            log.warning("--data-dir %s is not used: redis at %s already answers, and keeps (or loses) its data "
                        "as its own configuration says", data_dir, describe_redis(settings.server))
        return None
    except RedisError as exc:
        refused = refusal(exc, settings.server)
        if refused is not None:
            raise refused from None
    finally:
        client.close()
    if redis_address(settings.server).kind != "single":
        raise RuntimeError(f"redis ({describe_redis(settings.server)}) does not answer; goinfer up starts a private "
                           "redis-server only for a single-node address, not for a Sentinel service or a Cluster")
    # Address and password as the tiers will use them: RedisServer may be a URL carrying both.
    pool = redis.ConnectionPool.from_url(redis_url(settings.server))
    connection = pool.connection_kwargs
    host, port = str(connection.get("host", "127.0.0.1")), int(connection.get("port", 6379))
    if pool.connection_class is not redis.Connection:
        raise RuntimeError(f"redis at {describe_redis(settings.server)} does not answer; goinfer up starts a private "
                           "redis-server only for plain redis:// addresses, not TLS (rediss://) or unix sockets")
    if not _is_local(host):
        raise RuntimeError(f"redis at {host}:{port} does not answer, and it is not on this machine")
    executable = find_redis_server()
    if executable is None:
        raise RuntimeError(f"redis at {host}:{port} does not answer and no redis-server is installed: {INSTALL_HINT}")
    private = start_redis_server(port, password=connection.get("password") or None, host=_bind_address(host),
                                 executable=executable, timeout_s=REDIS_START_TIMEOUT_S, data_dir=data_dir)
    log.info("started a private redis-server on %s (pid %d, %s)", private.address, private.process.pid,
             _persistence(private))
    return private


def _persistence(private: RedisServer) -> str:
    """Where the private server's data lives, and whether it outlives it: the user must know
    whether stopping `up` loses the queued requests."""
    if private.data_dir is None:
        return f"no persistence: its files are in {private.folder}, removed when it stops"
    try:
        with private.client(socket_timeout=2.0) as client:
            kept = f"{client.dbsize()} keys kept from before"
    except RedisError as exc:
        kept = f"keys kept from before unknown: {exc}"
    return f"data in {private.data_dir}: append-only file, fsync every second; {kept}"


class ReadinessProgress:
    """Asks the HTTP tier's /ready until it answers 200, and says meanwhile what the service
    waits for (the HTTP tier to listen, Redis, a dispatcher loading its models), so that a model
    that takes a minute to load does not look like a hung `up`."""

    def __init__(self, url: str, stream: TextIO | None = None) -> None:
        self._url = url.rstrip("/")
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._interval = PROGRESS_TTY_S if self._tty else PROGRESS_LOG_S
        self._next = time.monotonic() + self._interval
        self.ready = False

    def poll(self) -> None:
        """Check once if due; prints the ready line once ready."""
        if self.ready or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self._interval
        status, body = self._probe()
        if status == 200:
            self.ready = True
            if self._tty:
                self._stream.write("\r\x1b[K")
                self._stream.flush()
            log.info("goinfer up: ready on %s", self._url)
            return
        line = waiting_line(status, body)
        if self._tty:
            self._stream.write(f"\r\x1b[K{line}")
            self._stream.flush()
        else:
            log.info("%s", line)

    def _probe(self) -> tuple[int | None, dict[str, Any]]:
        try:
            with urllib.request.urlopen(self._url + "/ready", timeout=PROBE_TIMEOUT_S) as response:
                return response.status, _json_object(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _json_object(exc.read())
        except (OSError, ValueError):
            return None, {}


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def waiting_line(status: int | None, body: dict[str, Any]) -> str:
    """What the service waits for, from a /ready answer that is not 200 (status None: no answer)."""
    if status is None:
        return "waiting for the HTTP tier to listen"
    if body.get("redis") is False:
        return "waiting for redis"
    lines = body.get("waiting_for")
    if isinstance(lines, list) and lines:
        return "waiting for " + "; ".join(str(line).replace("queue ", "dispatcher ", 1) for line in lines)
    missing = body.get("missing_queues")
    if isinstance(missing, list) and missing:
        return "waiting for a dispatcher of " + ", ".join(str(stream) for stream in missing)
    return f"waiting for the service to be ready (/ready answered {status})"


def _http_child(settings: Settings, model_paths: list[str]) -> None:
    from goinfer.http.server import run_http, run_http_processes
    from goinfer.models.registry import ModelRegistry

    setup_logging()
    try:
        if settings.api.http_workers > 1:
            raise SystemExit(run_http_processes(settings, model_paths, settings.api.http_workers))
        registry = ModelRegistry()
        registry.extend_from_paths(model_paths)
        run_http(settings, registry)
    except SettingsError as exc:  # e.g. Redis refusing the credentials: one line, exit status 2
        fatal(str(exc))


def _dispatcher_child(settings: Settings, queue_index: int, model_paths: list[str]) -> None:
    from goinfer.dispatcher.supervisor import run_dispatcher

    setup_logging()
    raise SystemExit(run_dispatcher(settings, queue_index, model_paths))


def run_up(settings: Settings, model_paths: Sequence[str], data_dir: str | os.PathLike[str] | None = None) -> int:
    """Run Redis (if needed; persisting to `data_dir` when given), the dispatchers and the HTTP
    tier until a signal or a child dies."""
    stop = StopSignals()
    try:
        private_redis = ensure_redis(settings, data_dir)
    except (RedisRefused, DataFolderError) as exc:  # the user's to fix: one line, exit status 2
        fatal(str(exc))
    except RuntimeError as exc:
        log.error("%s", exc)
        return EXIT_FAILED

    context = multiprocessing.get_context("spawn")
    children: dict[str, BaseProcess] = {}
    paths = list(model_paths)
    for index in range(settings.server.request_queue_amount):
        children[f"dispatcher {index}"] = context.Process(
            target=_dispatcher_child, args=(settings, index, paths), name=f"goinfer-server-{index}")
    children["http"] = context.Process(target=_http_child, args=(settings, paths), name="goinfer-http")
    status = 0
    try:
        for child in children.values():
            start_child(child)
        log.info("goinfer up: %s; Ctrl-C stops everything", ", ".join(children))
        progress = ReadinessProgress(default_url(settings))
        sentinels = [child.sentinel for child in children.values()]
        redis_deaths: list[float] = []
        while not stop.requested:
            done = wait(sentinels, timeout=0.5)
            if not done and not stop.requested:
                progress.poll()
            if private_redis is not None and not private_redis.running() and not stop.requested:
                private_redis = _restart_redis(private_redis, redis_deaths)
                if private_redis is None:
                    status = EXIT_FAILED
                    break
            if done and not stop.requested:
                name = next(name for name, child in children.items() if child.sentinel in done)
                code = exit_code(children[name])
                if code == 0:
                    log.info("%s stopped; stopping everything", name)
                else:
                    log.error("%s exited with code %s; stopping everything", name, code)
                    # A settings problem (exit status 2: e.g. Redis refusing the password) stays one.
                    status = EXIT_CONFIG if code == EXIT_CONFIG else EXIT_FAILED
                break
    finally:
        _stop_children(children)
        if private_redis is not None:
            private_redis.stop()
    log.info("goinfer up: stopped")
    return status


def _restart_redis(dead: RedisServer, deaths: list[float]) -> RedisServer | None:
    """A new private redis-server in place of `dead`, or None (logged) if it keeps dying or
    cannot start.

    The tiers wait a Redis outage out by themselves, so only Redis needs starting again. With a
    data folder it comes back with the queue as the append-only file kept it, and the requests
    waiting in it are served; without one it comes back empty, and their clients get QueueTimeout.
    """
    code = dead.process.returncode
    if code is not None and code < 0:  # its log says nothing about a signal: name the signal
        how = f"was killed by signal {-code} ({_signal_name(-code)})"
    else:  # it stopped itself, and its log says why
        how = f"exited with code {code}: {dead.last_words()}"
    log.error("the private redis-server (pid %d) %s", dead.process.pid, how)
    dead.stop()  # its temporary folder; its data folder stays
    now = time.monotonic()
    deaths[:] = [*(death for death in deaths if now - death < REDIS_RESTART_WINDOW_S), now]
    if len(deaths) > REDIS_RESTART_LIMIT:
        log.error("the private redis-server died %d times within %gs; stopping everything", len(deaths),
                  REDIS_RESTART_WINDOW_S)
        return None
    what = "with the queue its append-only file kept" if dead.data_dir else \
        "empty (no --data-dir): the requests queued in it are lost, and answered QueueTimeout"
    log.warning("starting the private redis-server again, %s", what)
    try:
        executable = find_redis_server()
        if executable is None:
            raise RedisServerError(f"no redis-server found: {INSTALL_HINT}")
        private = start_redis_server(dead.port, password=dead.password, host=dead.host, executable=executable,
                                     timeout_s=REDIS_START_TIMEOUT_S, data_dir=dead.data_dir)
    except RedisServerError as exc:
        log.error("%s; stopping everything", exc)
        return None
    log.info("started a private redis-server on %s (pid %d, %s)", private.address, private.process.pid,
             _persistence(private))
    return private


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


def _stop_children(children: dict[str, BaseProcess]) -> None:
    # The HTTP tier first, so nothing new is queued while dispatchers finish their work.
    stop_processes([children["http"]], CHILD_STOP_GRACE_S)
    stop_processes([child for name, child in children.items() if name != "http"], CHILD_STOP_GRACE_S)
