"""`goinfer up`: the whole service on one machine, Redis included when none is running.

Children are spawned processes running the same functions as `goinfer http` and
`goinfer server N`, so single-machine mode behaves exactly like a distributed deployment.
"""

from __future__ import annotations

import ipaddress
import logging
import multiprocessing
import socket
from collections.abc import Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import redis
from redis.exceptions import RedisError

from goinfer.cli_options import EXIT_CONFIG, EXIT_FAILED, fatal
from goinfer.connections import RedisRefused, describe_redis, redis_url, refusal, sync_client
from goinfer.logs import setup_logging
from goinfer.processes import StopSignals, exit_code, start_child, stop_processes
from goinfer.redis_server import INSTALL_HINT, RedisServer, find_redis_server, start_redis_server
from goinfer.settings import Settings, SettingsError

log = logging.getLogger("goinfer.up")

REDIS_START_TIMEOUT_S = 10.0
CHILD_STOP_GRACE_S = 40.0


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


def ensure_redis(settings: Settings) -> RedisServer | None:
    """Start a private Redis if the configured one is local and silent; raise RuntimeError if
    impossible, RedisRefused if the Redis that answers refuses the credentials."""
    client: redis.Redis = sync_client(settings.server)
    try:
        client.ping()
        return None
    except RedisError as exc:
        refused = refusal(exc, settings.server)
        if refused is not None:
            raise refused from None
    finally:
        client.close()
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
                                 executable=executable, timeout_s=REDIS_START_TIMEOUT_S)
    log.info("started a private redis-server on %s (pid %d, files in %s)",
             private.address, private.process.pid, private.folder)
    return private


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


def run_up(settings: Settings, model_paths: Sequence[str]) -> int:
    """Run Redis (if needed), the dispatchers and the HTTP tier until a signal or a child dies."""
    stop = StopSignals()
    try:
        private_redis = ensure_redis(settings)
    except RedisRefused as exc:
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
        sentinels = [child.sentinel for child in children.values()]
        while not stop.requested:
            done = wait(sentinels, timeout=0.5)
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


def _stop_children(children: dict[str, BaseProcess]) -> None:
    # The HTTP tier first, so nothing new is queued while dispatchers finish their work.
    stop_processes([children["http"]], CHILD_STOP_GRACE_S)
    stop_processes([child for name, child in children.items() if name != "http"], CHILD_STOP_GRACE_S)
