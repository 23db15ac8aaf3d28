"""Test harness: a real redis-server per session, real goinfer processes, real HTTP.

The machinery lives in goinfer.testing (shared with the benchmarks and open to users); this file
adds what only goinfer's own tests want: the test models on the path, a second app id allowed
to sign `plain`, and the pytest fixtures. Every test gets its own queue name, so processes of
one test never see another's requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from goinfer import testing
from goinfer.redis_server import RedisServer, RedisServerError
from goinfer.testing import (
    TEST_CREDENTIALS,
    GoinferProcess,
    HarnessError,
    free_port,
    post_raw,
    settings_of,
    url_of,
    wait_until,
)

from testdata import goinfer_vectors

__all__ = [
    "APP_ID", "APP_SECRET", "PLAIN_APP_ID", "PLAIN_APP_SECRET", "ROOT", "SM2_PRIVATE_KEY", "TESTS", "GoinferProcess",
    "HarnessError", "ProcessFactory", "RedisServer", "free_port", "post_raw", "process_env", "settings_of",
    "start_redis", "stop_redis", "url_of", "wait_until", "write_settings",
]

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

APP_ID = TEST_CREDENTIALS.app_id
APP_SECRET = TEST_CREDENTIALS.app_secret
SM2_PRIVATE_KEY = TEST_CREDENTIALS.sm2_private_key
PLAIN_APP_ID = "PLAINAPP0000000000000000000000001"
PLAIN_APP_SECRET = "plain-secret"

# Processes import the test models (tests/sample_models.py) and the examples by module name.
PYTHON_PATH = (TESTS, ROOT)


def start_redis(port: int | None = None, *, password: str | None = None) -> RedisServer:
    try:
        return testing.start_redis(port, password=password)
    except RedisServerError as exc:
        pytest.fail(f"{exc} (tests/run.sh installs redis-server)")


def stop_redis(server: RedisServer) -> None:
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    stop_redis(server)


def write_settings(folder: Path, redis_address: str, *, name: str = "settings.yaml", **sections: Any) -> Path:
    """A settings file with the vectors' credentials, a free port and a queue of its own."""
    defaults: dict[str, Any] = {
        "API": {
            "AppIdSecret": {APP_ID: APP_SECRET, PLAIN_APP_ID: PLAIN_APP_SECRET},
            "RequestTimestampDiff": 300,
            "AllowSignPlain": [PLAIN_APP_ID],
            "ShutdownDrainS": 0.2,  # tests stop many tiers; test_reliability checks the drain
        },
        "Server": {"RedisPasswd": "", "MessageTimeout": 10, "MaxWorkers": 2},
        "Models": ["goinfer.models.echo:Echo", "sample_models:Greeter", "sample_models:Faulty"],
    }
    return testing.write_settings(folder, redis_address, name=name, **testing.merge_settings(defaults, sections))


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return testing.process_env(extra, python_path=PYTHON_PATH)


class ProcessFactory(testing.ProcessFactory):
    """goinfer.testing's factory with the test models on the path."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, python_path=PYTHON_PATH)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessFactory]:
    factory = ProcessFactory(tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    return goinfer_vectors()
