"""Test harness: a real redis-server per session, real goinfer processes, real HTTP.

Every test gets its own queue name, so processes of one test never see another's requests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
import yaml

from testdata import goinfer_vectors

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

APP_ID = "3EA25569454745D01219080B779F021F"
APP_SECRET = "41DF0E6AE27B5282C07EF5124642A352"
SM2_PRIVATE_KEY = "JShsBOJL0RgPAoPttEB1hgtPAvCikOl0V1oTOYL7k5U="
PLAIN_APP_ID = "PLAINAPP0000000000000000000000001"
PLAIN_APP_SECRET = "plain-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    folder: str
    password: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)


def start_redis(port: int | None = None, *, password: str | None = None) -> RedisServer:
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server (.ci/run does this)")
    port = port or free_port()
    folder = tempfile.mkdtemp(prefix="goinfer-test-redis-")
    args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", folder, "--loglevel", "warning"]
    if password:
        args += ["--requirepass", password]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    server = RedisServer(port, process, folder, password)

    def answers() -> bool:
        try:
            return bool(server.client().ping())
        except redis.RedisError:
            return False

    wait_until(answers, 10, "redis-server to start")
    return server


def stop_redis(server: RedisServer) -> None:
    server.process.terminate()
    server.process.wait(10)
    shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    stop_redis(server)


def write_settings(folder: Path, redis_address: str, *, name: str = "settings.yaml", **sections: Any) -> Path:
    """A settings file with the vectors' credentials, a free port and a queue of its own."""
    document: dict[str, Any] = {
        "API": {
            "Port": free_port(),
            "Addr": "127.0.0.1",
            "SM2PrivateKey": SM2_PRIVATE_KEY,
            "AppIdSecret": {APP_ID: APP_SECRET, PLAIN_APP_ID: PLAIN_APP_SECRET},
            "RequestTimestampDiff": 300,
            "AllowSignPlain": [PLAIN_APP_ID],
            "ShutdownDrainS": 0.2,  # tests stop many tiers; test_reliability checks the drain
        },
        "Server": {
            "RedisServer": redis_address,
            "RedisPasswd": "",
            "QueueName": f"test-{uuid.uuid4().hex[:10]}-",
            "RequestQueueAmount": 1,
            "MessageTimeout": 10,
            "MaxWorkers": 2,
        },
        "Models": ["goinfer.models.echo:Echo", "sample_models:Greeter", "sample_models:Faulty"],
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(document.get(section), dict):
            document[section].update(values)
        else:
            document[section] = values
    path = folder / name
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    return path


def settings_of(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class GoinferProcess:
    """A running `goinfer ...` command with its combined output in a log file."""

    args: list[str]
    log_path: Path
    process: subprocess.Popen
    _log_file: Any = field(repr=False, default=None)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        def seen() -> bool:
            if self.process.poll() is not None and text not in self.output:
                raise AssertionError(f"{self.args} exited ({self.process.returncode}) before "
                                     f"printing {text!r}:\n{self.output}")
            return text in self.output

        wait_until(seen, timeout, f"{text!r} from {self.args}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                raise AssertionError(f"{self.args} did not stop within {timeout}s:\n{self.output}")
        return self.process.returncode

    def kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


class ProcessFactory:
    """Starts goinfer commands for one test and makes sure none outlives it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[GoinferProcess] = []

    def start(self, *args: str, program: list[str] | None = None, env: dict[str, str] | None = None) -> GoinferProcess:
        command = (program or [sys.executable, "-m", "goinfer"]) + list(args)
        log_path = self.folder / f"proc-{len(self.started)}.log"
        log_file = open(log_path, "wb")
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.folder,
                                   env=process_env(env), start_new_session=True)
        proc = GoinferProcess(command, log_path, process, log_file)
        self.started.append(proc)
        return proc

    def http(self, settings: Path, **kwargs: Any) -> GoinferProcess:
        proc = self.start("http", "--yaml", str(settings), **kwargs)
        port = settings_of(settings)["API"]["Port"]

        def serving() -> bool:
            if proc.process.poll() is not None:
                raise AssertionError(f"http tier exited ({proc.process.returncode}):\n{proc.output}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(serving, 30, "the HTTP tier to serve")
        return proc

    def server(self, settings: Path, queue: int = 0, wait: bool = True, **kwargs: Any) -> GoinferProcess:
        proc = self.start("server", str(queue), "--yaml", str(settings), **kwargs)
        if wait:
            proc.wait_for_output(f"dispatcher for queue {queue} ready", 60)
        return proc

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.process.poll() is None:
                try:
                    proc.stop(timeout=15)
                except AssertionError:
                    pass
            proc.kill_group()
            if proc._log_file:
                proc._log_file.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessFactory]:
    factory = ProcessFactory(tmp_path)
    yield factory
    factory.cleanup()


def url_of(settings: Path) -> str:
    return f"http://127.0.0.1:{settings_of(settings)['API']['Port']}"


def post_raw(url: str, body: bytes, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    return goinfer_vectors()
