"""Helpers for testing goinfer services end to end: a real Redis, real processes, real HTTP.

goinfer's own tests and benchmarks use these, and so can yours (as aiohttp.test_utils is for
aiohttp):

    from goinfer.testing import ProcessFactory, TEST_CREDENTIALS, start_redis, url_of, write_settings

    with start_redis() as redis_server:
        settings = write_settings(tmp_path, redis_server.address, Models=["mymodels:Reverse"])
        processes = ProcessFactory(tmp_path, python_path=[project_root])
        try:
            processes.http(settings)
            processes.server(settings)
            client = TEST_CREDENTIALS.client(url_of(settings), sign_type="SHA256")
            assert client.call("/api/reverse", {"text": "abc"}) == {...}
        finally:
            processes.cleanup()

Failures raise HarnessError, an AssertionError, so under pytest they read as test failures with
the process's output attached.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from goinfer.client import Client, SignType, signed_body
from goinfer.crypto.sm2 import generate_keypair
from goinfer.redis_server import RedisServer, RedisServerError, start_redis_server

__all__ = [
    "TEST_CREDENTIALS", "Credentials", "FaultProxy", "GoinferProcess", "HarnessError", "ProcessFactory", "RedisServer",
    "RedisServerError", "free_port", "merge_settings", "post_raw", "process_env", "settings_of", "start_redis",
    "url_of", "wait_for_answer", "wait_until", "write_settings",
]

T = TypeVar("T")
GOINFER = (sys.executable, "-m", "goinfer")


class HarnessError(AssertionError):
    """Something a test waited for did not happen; an AssertionError so pytest reports it as a failure."""


@dataclass(frozen=True)
class Credentials:
    """An app id, its secret and the SM2 key: what a settings file grants and a client signs with."""

    app_id: str
    app_secret: str
    sm2_private_key: str

    def body(self, data: dict[str, Any], sign_type: SignType = "SHA256", timestamp: int | None = None) -> bytes:
        """A signed request body, exactly as go-infer's clients send it."""
        return signed_body(data, app_id=self.app_id, app_secret=self.app_secret, sign_type=sign_type,
                           sm2_private_key=self.sm2_private_key, timestamp=timestamp)

    def client(self, url: str, sign_type: SignType = "SHA256", timeout: float = 30.0) -> Client:
        return Client(url, self.app_id, self.app_secret, sign_type=sign_type,
                      sm2_private_key=self.sm2_private_key, timeout=timeout)

    @classmethod
    def fresh(cls) -> Credentials:
        """New random credentials, for a tier that listens beyond loopback (published ones are refused there)."""
        private_key, _public_key = generate_keypair()
        return cls(secrets.token_hex(16).upper(), secrets.token_hex(16).upper(), private_key)


# The credentials of go-infer's published test vectors: public, for tests and benchmarks only.
TEST_CREDENTIALS = Credentials(
    app_id="3EA25569454745D01219080B779F021F",
    app_secret="41DF0E6AE27B5282C07EF5124642A352",
    sm2_private_key="JShsBOJL0RgPAoPttEB1hgtPAvCikOl0V1oTOYL7k5U=",
)


# --- waiting and ports ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on the loopback interface right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str | Callable[[], str],
               interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something true, and return that; HarnessError after `timeout`.

    `what` may be a callable, read only on the timeout: a message that quotes a process's output
    must show what it printed while we waited, not what it had printed before."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise HarnessError(f"timed out after {timeout}s waiting for {described}")
        time.sleep(interval)


# --- Redis ----------------------------------------------------------------------------------------


def start_redis(port: int | None = None, *, password: str | None = None) -> RedisServer:
    """A private redis-server on loopback (a free port unless given); stop it with `.stop()` or `with`."""
    return start_redis_server(port or free_port(), password=password)


class FaultProxy:
    """A TCP proxy that fails the way networks do, for putting between a goinfer tier and Redis.

    Point a tier's `Server.RedisServer` at `proxy.address` and the proxy forwards to the real
    server until told otherwise:

    - `blackhole()`: nothing is forwarded any more, in either direction, but every socket stays
      open, as when Redis's host reboots or a virtual IP moves: the peer sees no error, only
      silence. New connections are accepted and held the same way, unless
      `new_connections=False` (the address now leads to a healthy server: only the connections
      made before are dead). `answers_only=True` holds only what Redis sends back: commands
      still reach it and run, their answers are lost on the way (a one-way partition).
    - `reset()`: every open connection is closed with a TCP RST (SO_LINGER 0) on both sides.
    - `heal()`: forwarding resumes; bytes held while black-holed are delivered then, as when a
      network partition ends.

    It runs its own event loop in a daemon thread, so tests call it from plain code.
    """

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.resets = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="goinfer-fault-proxy", daemon=True)
        self._connections: set[_ProxiedConnection] = set()
        self._hold_new: tuple[bool, bool] | None = None  # (commands, answers) held on new connections
        self._server: asyncio.AbstractServer | None = None

    @classmethod
    def to(cls, redis_server: RedisServer) -> FaultProxy:
        """A started proxy in front of `redis_server`."""
        return cls(redis_server.host, redis_server.port).start()

    @property
    def address(self) -> str:
        """`host:port`, as `Server.RedisServer` spells it."""
        return f"127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return self._call(self._count)

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen)
        return self

    def blackhole(self, new_connections: bool = True, answers_only: bool = False) -> None:
        """Stop forwarding on every open connection (and on new ones unless `new_connections` is
        False); with `answers_only`, only from Redis back to its clients."""
        self._call(self._blackhole, new_connections, answers_only)

    def heal(self) -> None:
        """Forward again, on every connection; what was held is delivered now."""
        self._call(self._heal)

    def reset(self) -> int:
        """Close every open connection with a TCP RST; returns how many there were."""
        return self._call(self._reset)

    def stop(self) -> None:
        """Close the listening socket and every connection, and end the thread."""
        if not self._thread.is_alive():
            return
        self._call(self._close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            result = function(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _count(self) -> int:
        return len(self._connections)

    def _blackhole(self, new_connections: bool, answers_only: bool) -> None:
        self._hold_new = (not answers_only, True) if new_connections else None
        for connection in self._connections:
            connection.hold(commands=not answers_only, answers=True)

    def _heal(self) -> None:
        self._hold_new = None
        for connection in self._connections:
            connection.hold(commands=False, answers=False)

    def _reset(self) -> int:
        connections, self._connections = list(self._connections), set()
        for connection in connections:
            connection.abort()
        self.resets += 1
        return len(connections)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset()
        # Aborted sockets end their pumps; waiting for them keeps the loop's shutdown quiet.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=2)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        connection = _ProxiedConnection(client_writer)
        commands, answers = self._hold_new or (False, False)
        connection.hold(commands=commands, answers=answers)
        self._connections.add(connection)
        try:
            await connection.to_server.wait()
            if client_writer.transport.is_closing():  # reset while held
                return
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.target)
            except OSError:
                connection.abort()
                return
            connection.server_writer = server_writer
            await asyncio.gather(connection.pump(client_reader, server_writer, connection.to_server),
                                 connection.pump(server_reader, client_writer, connection.to_client))
        finally:
            self._connections.discard(connection)
            connection.close()


class _ProxiedConnection:
    """One client connection of a FaultProxy and its connection to the target."""

    def __init__(self, client_writer: asyncio.StreamWriter) -> None:
        self.client_writer = client_writer
        self.server_writer: asyncio.StreamWriter | None = None
        self.to_server = asyncio.Event()  # set: commands flow
        self.to_client = asyncio.Event()  # set: answers flow

    def hold(self, *, commands: bool, answers: bool) -> None:
        for event, held in ((self.to_server, commands), (self.to_client, answers)):
            if held:
                event.clear()
            else:
                event.set()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
        """Copy one direction while flowing; bytes read just before a black-hole wait for the heal."""
        try:
            while True:
                await flowing.wait()
                data = await reader.read(65536)
                await flowing.wait()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, RuntimeError):
            self.abort()

    def abort(self) -> None:
        """Both sides closed with RST (SO_LINGER 0), as a crashed peer or a middlebox does."""
        for writer in (self.client_writer, self.server_writer):
            if writer is None or writer.transport.is_closing():
                continue
            sock = writer.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            writer.transport.abort()
        self.hold(commands=False, answers=False)  # let the pumps see the closed sockets and end

    def close(self) -> None:
        for writer in (self.client_writer, self.server_writer):
            if writer is not None and not writer.transport.is_closing():
                writer.close()


# --- settings -------------------------------------------------------------------------------------


def merge_settings(document: Mapping[str, Any], sections: Mapping[str, Any]) -> dict[str, Any]:
    """`document` with `sections` applied: a mapping updates the section of that name, anything else replaces it."""
    merged = {name: dict(value) if isinstance(value, Mapping) else value for name, value in document.items()}
    for name, values in sections.items():
        if isinstance(values, Mapping) and isinstance(merged.get(name), dict):
            merged[name].update(values)
        else:
            merged[name] = values
    return merged


def write_settings(folder: Path, redis_address: str, *, name: str = "settings.yaml",
                   credentials: Credentials = TEST_CREDENTIALS, **sections: Any) -> Path:
    """A settings file with a free port and a queue name of its own, so tests never share a queue.

    It serves the built-in echo model; `sections` override it as `merge_settings` does, e.g.
    `Server={"MaxWorkers": 1}, Models=["mymodels:Reverse"]`.
    """
    document: dict[str, Any] = {
        "API": {
            "Port": free_port(),
            "Addr": "127.0.0.1",
            "SM2PrivateKey": credentials.sm2_private_key,
            "AppIdSecret": {credentials.app_id: credentials.app_secret},
        },
        "Server": {
            "RedisServer": redis_address,
            "QueueName": f"test-{uuid.uuid4().hex[:10]}-",
            "RequestQueueAmount": 1,
        },
        "Models": ["goinfer.models.echo:Echo"],
    }
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(merge_settings(document, sections), allow_unicode=True))
    return path


def settings_of(path: Path) -> dict[str, Any]:
    """The settings file as a plain document (what write_settings wrote)."""
    document: dict[str, Any] = yaml.safe_load(Path(path).read_text())
    return document


def url_of(settings: Path) -> str:
    """The HTTP tier's base URL for a settings file."""
    return f"http://127.0.0.1:{settings_of(settings)['API']['Port']}"


# --- HTTP ---------------------------------------------------------------------------------------


def post_raw(url: str, body: bytes, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """POST a body as it is and return (HTTP status, decoded JSON): for what Client would refuse to send."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def wait_for_answer(url: str, body: bytes, timeout: float = 120) -> dict[str, Any]:
    """Send `body` until the service answers it with code 0 (the whole path works), and return the envelope."""

    def answer() -> dict[str, Any] | None:
        try:
            _, envelope = post_raw(url, body, timeout=30)
        except (OSError, ValueError):
            return None
        return envelope if envelope.get("code") == 0 else None

    return wait_until(answer, timeout, f"{url} to answer with code 0", interval=0.1)


# --- processes ------------------------------------------------------------------------------------


def process_env(extra: Mapping[str, str] | None = None, *, python_path: Iterable[str | Path] = ()) -> dict[str, str]:
    """This process's environment, unbuffered, with `python_path` ahead of $PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(path) for path in python_path]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class GoinferProcess:
    """A running command (its own process group) with its combined output in a log file."""

    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        """Wait until `text` appears in the output; HarnessError, with the output, if the process exits first."""
        self.wait_while_running(lambda: text in self.output, timeout, f"printing {text!r}")

    def wait_while_running(self, predicate: Callable[[], T | None], timeout: float, what: str) -> T:
        """`wait_until(predicate)`, but HarnessError at once if this process exits first, and the
        process's output in the error either way: a test waiting on a process that died learns
        nothing from a minute of polling, nor from a message without its log."""

        def running_check() -> T | None:
            value = predicate()
            if not value and self.process.poll() is not None:
                raise HarnessError(f"{self.args} exited ({self.process.returncode}) before {what}:\n{self.output}")
            return value

        return wait_until(running_check, timeout, lambda: f"{what} from {self.args}:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` and return the exit code; a process still running after `timeout` is killed (HarnessError)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self._wait_or_kill(timeout)
        return int(self.process.returncode)

    def kill_group(self) -> None:
        """SIGKILL the whole process group: children a crashed parent left behind included."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def _wait_or_kill(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise HarnessError(f"{self.args} did not stop within {timeout}s:\n{self.output}") from None


class ProcessFactory:
    """Starts goinfer commands in `folder` (their logs too) and makes sure none outlives `cleanup()`."""

    def __init__(self, folder: Path, *, python_path: Iterable[str | Path] = (),
                 env: Mapping[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.python_path = [str(path) for path in python_path]
        self.env = dict(env or {})
        self.started: list[GoinferProcess] = []
        self._count = 0

    def start(self, *args: str, program: Iterable[str] | None = None, env: Mapping[str, str] | None = None,
              log_name: str = "proc") -> GoinferProcess:
        """Run `program args` (program: `python -m goinfer` unless given) in its own process group."""
        command = [*(GOINFER if program is None else program), *args]
        log_path = self.folder / f"{log_name}-{self._count}.log"
        self._count += 1
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                       cwd=self.folder, start_new_session=True,
                                       env=process_env({**self.env, **(env or {})}, python_path=self.python_path))
        proc = GoinferProcess(command, log_path, process)
        self.started.append(proc)
        return proc

    def http(self, settings: Path, **kwargs: Any) -> GoinferProcess:
        """`goinfer http`, returned once it serves GET / (HarnessError with its output if it exits)."""
        proc = self.start("http", "--yaml", str(settings), **kwargs)
        url = url_of(settings) + "/"

        def serving() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        proc.wait_while_running(serving, 30, "serving GET /")
        return proc

    def server(self, settings: Path, queue: int = 0, wait: bool = True, **kwargs: Any) -> GoinferProcess:
        """`goinfer server N`, returned once it says it is ready (unless `wait` is false)."""
        proc = self.start("server", str(queue), "--yaml", str(settings), **kwargs)
        if wait:
            proc.wait_for_output(f"dispatcher for queue {queue} ready", 60)
        return proc

    def cleanup(self, grace_s: float = 15) -> None:
        """SIGTERM every live process at once, wait up to `grace_s`, then kill each process group."""
        started, self.started = self.started, []
        for proc in started:
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in started:
            try:
                proc.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            proc.kill_group()
