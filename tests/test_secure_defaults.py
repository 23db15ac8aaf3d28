"""Secure by default: loopback unless told otherwise; go-infer's published credentials never leave it."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml

from goinfer.published import (
    PUBLISHED_APP_SECRETS,
    PUBLISHED_REDIS_PASSWORDS,
    PUBLISHED_SM2_PRIVATE_KEYS,
    is_loopback,
    published_keys,
    published_verdict,
)
from goinfer.settings import Settings, load_settings, parse_settings
from goinfer.testing import Credentials
from goinfer.tools import new_keypair

from conftest import (
    ROOT,
    RedisServer,
    free_port,
    process_env,
    start_redis,
    stop_redis,
    url_of,
    write_settings,
)

SHIPPED = str(ROOT / "config" / "settings.yaml")
PUBLISHED_VALUES = (*PUBLISHED_SM2_PRIVATE_KEYS, *PUBLISHED_APP_SECRETS, *PUBLISHED_REDIS_PASSWORDS)
ALL_PUBLISHED = "API.SM2PrivateKey, API.AppIdSecret, Server.RedisPasswd"


def fresh_credentials() -> Credentials:
    return Credentials(secrets.token_hex(16).upper(), secrets.token_hex(16).upper(), new_keypair().private_b64)


def fresh_api(creds: Credentials, addr: str = "127.0.0.1") -> dict[str, object]:
    """The API section of a settings file that grants `creds` only."""
    return {"Addr": addr, "SM2PrivateKey": creds.sm2_private_key, "AppIdSecret": {creds.app_id: creds.app_secret},
            "AllowSignPlain": []}


def goinfer(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "goinfer", *args], capture_output=True, text=True,
                          env=process_env(env), cwd=ROOT, timeout=timeout)


def no_published_value(text: str) -> None:
    for value in PUBLISHED_VALUES:
        assert value not in text


def test_the_default_address_is_loopback():
    assert parse_settings("", "empty.yaml").api.addr == "127.0.0.1"
    assert load_settings(SHIPPED, environ={}).api.addr == "127.0.0.1"


def test_the_shipped_file_holds_the_published_values():
    assert published_keys(load_settings(SHIPPED, environ={})) == tuple(ALL_PUBLISHED.split(", "))
    embedding = load_settings(str(ROOT / "examples" / "embedding" / "settings.yaml"), environ={})
    assert published_verdict(embedding).warns  # served on 127.0.0.1 with a warning


def _settings(addr: str, **values: str) -> Settings:
    api = {"Addr": addr, "SM2PrivateKey": values.get("sm2", new_keypair().private_b64),
           "AppIdSecret": values.get("apps", {"MYAPP": "my-fresh-secret"})}
    server = {"RedisPasswd": values.get("redis_passwd", "fresh-redis-pw"),
              "RedisServer": values.get("redis_server", "127.0.0.1:7480")}
    return parse_settings(yaml.safe_dump({"API": api, "Server": server}), "x.yaml")


@pytest.mark.parametrize("values, key", [
    ({"sm2": "JShsBOJL0RgPAoPttEB1hgtPAvCikOl0V1oTOYL7k5U="}, "API.SM2PrivateKey"),
    ({"apps": {"3EA25569454745D01219080B779F021F": "41DF0E6AE27B5282C07EF5124642A352"}}, "API.AppIdSecret"),
    ({"apps": {"MYAPP": "41DF0E6AE27B5282C07EF5124642A352"}}, "API.AppIdSecret"),  # the secret alone
    ({"redis_passwd": "e18ffb7484f4d69c2acb40008471a71c"}, "Server.RedisPasswd"),
    ({"redis_server": "redis://:e18ffb7484f4d69c2acb40008471a71c@10.0.0.5:7480"}, "Server.RedisServer"),
])
def test_each_published_value_is_refused_off_loopback(values, key):
    for addr in ("0.0.0.0", "", "10.1.2.3", "::", "myhost.example"):
        verdict = published_verdict(_settings(addr, **values))
        assert verdict.refused and verdict.keys == (key,), (addr, verdict)
        assert key in verdict.message and "goinfer init" in verdict.message
        no_published_value(verdict.message)
    for addr in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        verdict = published_verdict(_settings(addr, **values))
        assert verdict.warns and not verdict.refused, addr


def test_fresh_values_pass_anywhere():
    assert published_verdict(_settings("0.0.0.0")).keys == ()
    # A published appId with a secret of its own is fine: appIds are not secrets.
    assert published_verdict(_settings("0.0.0.0", apps={"3EA25569454745D01219080B779F021F": "mine"})).keys == ()
    assert not is_loopback("0.0.0.0") and is_loopback("127.0.0.1")


@pytest.fixture(scope="module")
def published_redis() -> Iterator[RedisServer]:
    """A Redis with the shipped file's password, so that every other check passes."""
    server = start_redis(password="e18ffb7484f4d69c2acb40008471a71c")
    yield server
    stop_redis(server)


@pytest.mark.parametrize("command", [["http"], ["up"], ["check"]])
def test_published_values_on_all_addresses_are_refused(command, published_redis):
    """The shipped file with Addr 0.0.0.0 (set through the environment): exit status 2, one line."""
    env = {"GOINFER_API__ADDR": "0.0.0.0", "GOINFER_API__PORT": str(free_port()),
           "GOINFER_SERVER__REDISSERVER": published_redis.address}
    done = goinfer(*command, "--yaml", SHIPPED, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "published" in line or "FAIL" in line]
    assert len(lines) == 1, done.stdout + done.stderr
    line = lines[0]
    assert f"{ALL_PUBLISHED}: go-infer's published example values, refused on API.Addr 0.0.0.0" in line
    assert "goinfer init" in line and "GOINFER_SERVER__REDISPASSWD" in line
    if command == ["check"]:
        assert line.startswith("secrets: FAIL: ")
    else:
        assert done.stderr.splitlines() == [f"goinfer: error: {line.removeprefix('goinfer: error: ')}"]
    assert "Traceback" not in done.stderr
    no_published_value(done.stdout + done.stderr)


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "WARNING" in line]


def test_published_values_on_loopback_warn_once(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address,
                              Server={"RedisPasswd": "e18ffb7484f4d69c2acb40008471a71c"})
    http = processes.http(settings)
    http.stop()
    warnings = _warnings(http.output)
    assert len(warnings) == 1, http.output
    assert f"{settings}: {ALL_PUBLISHED}: go-infer's published example values, accepted because API.Addr " \
           "127.0.0.1 is loopback only" in warnings[0]
    no_published_value(http.output)

    settings = write_settings(tmp_path, redis_server.address, name="plain.yaml")
    done = goinfer("check", "--yaml", str(settings))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _warnings(done.stdout + done.stderr) == [
        f"secrets: WARNING: {settings}: API.SM2PrivateKey, API.AppIdSecret: go-infer's published example values, "
        "accepted because API.Addr 127.0.0.1 is loopback only; run `goinfer init` for a project with fresh ones"]
    no_published_value(done.stdout + done.stderr)


def test_fresh_values_serve_on_all_addresses_without_a_warning(tmp_path, redis_server, processes):
    creds = fresh_credentials()
    settings = write_settings(tmp_path, redis_server.address, Server={"MaxWorkers": 1}, API=fresh_api(creds, "0.0.0.0"))
    processes.server(settings)
    http = processes.http(settings)
    assert creds.client(url_of(settings), sign_type="SM2").call("/api/echo", {"a": 1})["a"] == 1
    assert _warnings(http.output) == [], http.output
    done = goinfer("check", "--yaml", str(settings))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "secrets: ok (no published example values)" in done.stdout
    assert _warnings(done.stdout + done.stderr) == []
