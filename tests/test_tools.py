"""The operator tools `goinfer call`, `goinfer keygen` and `goinfer check`, run as commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_secure_defaults import fresh_api, fresh_credentials

from goinfer.crypto.sm2 import (
    SM2Verifier,
    private_key_from_b64,
    public_key_from_hex,
    public_key_from_private_b64,
    sign,
)

from conftest import (
    APP_SECRET,
    SM2_PRIVATE_KEY,
    free_port,
    process_env,
    url_of,
    write_settings,
)

SECRETS = (APP_SECRET, SM2_PRIVATE_KEY)


def goinfer(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "goinfer", *args], capture_output=True, text=True,
                          env=process_env(), cwd=cwd, timeout=timeout)


@pytest.fixture
def serving(tmp_path, redis_server, processes) -> Path:
    """An HTTP tier and one dispatcher on a settings file of their own."""
    settings = write_settings(tmp_path, redis_server.address, Server={"MaxWorkers": 1})
    processes.server(settings)
    processes.http(settings)
    return settings


def test_call_prints_the_answer(serving):
    done = goinfer("call", "/api/greet", "--data", '{"name": "林"}', "--yaml", str(serving))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["greeting"] == "hello, 林" and answer["msg"] == "success"
    assert "林" in done.stdout  # printed as text, not \u escapes
    assert len(answer["requestId"]) == 40


def test_call_signs_with_sha256_and_plain(serving):
    sha = goinfer("call", "/api/echo", "--data", '{"a": [1, 2]}', "--sign", "SHA256", "--yaml", str(serving))
    assert sha.returncode == 0, sha.stderr
    assert json.loads(sha.stdout)["a"] == [1, 2]
    plain = goinfer("call", "/api/echo", "--sign", "plain", "--yaml", str(serving))
    assert plain.returncode == 0, plain.stderr  # the AllowSignPlain appId is chosen for plain


def test_call_reports_error_envelopes(serving):
    done = goinfer("call", "/api/greet", "--data", "{}", "--yaml", str(serving), "--url", url_of(serving))
    assert done.returncode == 1
    assert done.stderr.strip() == "error 1001: api entry fail : need name"
    assert done.stdout == ""
    unknown = goinfer("call", "/api/nowhere", "--yaml", str(serving))
    assert unknown.returncode == 1 and unknown.stderr.startswith("error 9709: ")
    stranger = goinfer("call", "/api/echo", "--app-id", "NOSUCHAPP", "--yaml", str(serving))
    assert stranger.returncode == 2 and "appId NOSUCHAPP is not in API.AppIdSecret" in stranger.stderr


def test_call_without_a_server_is_one_line(tmp_path, redis_server):
    settings = write_settings(tmp_path, redis_server.address)  # a free port: nothing listens
    done = goinfer("call", "/api/echo", "--yaml", str(settings))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"goinfer: error: cannot reach {url_of(settings)}: Connection refused"]


def test_call_refuses_bad_data(tmp_path, redis_server):
    settings = write_settings(tmp_path, redis_server.address)
    for bad in ('{"a": ', "[1, 2]"):
        done = goinfer("call", "/api/echo", "--data", bad, "--yaml", str(settings))
        assert done.returncode == 2 and "--data" in done.stderr, done.stderr


def test_keygen_prints_a_working_key_pair():
    done = goinfer("keygen")
    assert done.returncode == 0, done.stderr
    fields = dict(line.split(": ", 1) for line in done.stdout.splitlines() if not line.startswith("#"))
    private_b64 = fields["SM2PrivateKey"]
    public_hex, public_04 = fields["public key (x||y)"], fields["public key (04||x||y)"]
    assert len(public_hex) == 128 and public_04 == "04" + public_hex
    assert public_key_from_hex(public_04) == public_key_from_private_b64(private_b64)
    message = b"appId=3EA2&data={}&key=secret"
    signature = sign(private_key_from_b64(private_b64), message)
    assert SM2Verifier(public_key_from_hex(public_hex)).verify(message, signature)
    assert not SM2Verifier(public_key_from_hex(public_hex)).verify(message + b"!", signature)
    assert "SM2PrivateKey goes under API" in done.stdout
    assert goinfer("keygen").stdout != done.stdout  # a new key each time


def _lines(done: subprocess.CompletedProcess) -> dict[str, str]:
    return {line.split(":", 1)[0]: line for line in done.stdout.splitlines()}


def _no_secrets(done: subprocess.CompletedProcess) -> None:
    for secret in SECRETS:
        assert secret not in done.stdout + done.stderr


def test_check_passes_on_a_good_file(tmp_path, redis_server):
    creds = fresh_credentials()
    settings = write_settings(tmp_path, redis_server.address, API=fresh_api(creds))
    done = goinfer("check", "--yaml", str(settings))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _lines(done)
    assert set(lines) == {"settings", "secrets", "clients", "models", "SM2 key", "redis"}
    assert all(": ok" in line and "FAIL" not in line for line in lines.values()), done.stdout
    assert "/api/greet" in lines["models"] and redis_server.address in lines["redis"]
    assert done.stderr == ""
    for secret in (creds.app_secret, creds.sm2_private_key):
        assert secret not in done.stdout


@pytest.mark.parametrize("sections, failure", [
    ({"Server": {"RedisPaswd": "pw-not-shown"}},
     "settings: FAIL: {path}: Server.RedisPaswd: unknown key, ignored; did you mean Server.RedisPasswd?"),
    ({"api": {"Port": 5001}},
     "settings: FAIL: {path}: api: unknown key, ignored; did you mean API? (names are case-sensitive)"),
])
def test_check_fails_on_a_misspelt_key_or_section(tmp_path, redis_server, sections, failure):
    settings = write_settings(tmp_path, redis_server.address, API=fresh_api(fresh_credentials()), **sections)
    done = goinfer("check", "--yaml", str(settings))
    assert done.returncode == 1, done.stdout + done.stderr
    assert [line for line in done.stdout.splitlines() if "FAIL" in line] == [failure.format(path=settings)]
    assert "pw-not-shown" not in done.stdout + done.stderr
    assert done.stderr == ""  # the FAIL line says it; no warning besides


def test_check_fails_on_a_model_with_a_wrong_signature(tmp_path, redis_server):
    settings = write_settings(tmp_path, redis_server.address, Models=["sample_models:WrongInferSignature"])
    done = goinfer("check", "--yaml", str(settings))
    assert done.returncode == 1
    assert _lines(done)["models"] == (
        f"models: FAIL: {settings}: Models: model WrongInferSignature: "
        "infer must accept infer(self, request_id, params); it is infer(self, params) (too many positional arguments)"
    )


def test_check_names_the_versions_a_dispatcher_here_would_serve(tmp_path, redis_server):
    base = tmp_path / "models"
    (base / "3").mkdir(parents=True)
    entry = {"Class": "sample_models:VersionedAnswer", "ModelBasePath": str(base)}
    settings = write_settings(tmp_path, redis_server.address, API=fresh_api(fresh_credentials()), Models=[entry])
    done = goinfer("check", "--yaml", str(settings))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _lines(done)["models"] == "models: ok (1: /api/versioned; sample_models:VersionedAnswer version 3)"

    pinned = write_settings(tmp_path, redis_server.address, name="pinned.yaml", API=fresh_api(fresh_credentials()),
                            Models=[{**entry, "ModelVersion": 4}])
    done = goinfer("check", "--yaml", str(pinned))
    assert done.returncode == 0, done.stdout + done.stderr  # the folders may live on the dispatchers' machines
    line = _lines(done)["models"]
    assert line.startswith("models: WARNING: 1: /api/versioned; no version to serve on this machine: "
                           f"sample_models:VersionedAnswer: ModelVersion 4 is not under {base}"), line


def test_check_names_a_bad_model_path(tmp_path, redis_server):
    settings = write_settings(tmp_path, redis_server.address,
                              Models=["goinfer.models.echo:Echo", "sample_models:NoSuchModel"])
    done = goinfer("check", "--yaml", str(settings))
    assert done.returncode == 1
    lines = _lines(done)
    assert lines["models"].startswith("models: FAIL: ")
    assert "'sample_models:NoSuchModel'" in lines["models"] and "no 'NoSuchModel'" in lines["models"]
    assert lines["redis"].startswith("redis: ok")  # the other checks still run


def test_check_names_an_unreachable_redis(tmp_path):
    port = free_port()
    settings = write_settings(tmp_path, f"127.0.0.1:{port}", Server={"RedisPasswd": "pw-not-shown-42"})
    done = goinfer("check", "--yaml", str(settings))
    assert done.returncode == 1
    assert _lines(done)["redis"].startswith(f"redis: FAIL: 127.0.0.1:{port} does not answer")
    assert "pw-not-shown-42" not in done.stdout + done.stderr
    _no_secrets(done)


def test_check_refuses_an_unusable_file(tmp_path, redis_server):
    settings = write_settings(tmp_path, redis_server.address, API={"Port": "five thousand"})
    done = goinfer("check", "--yaml", str(settings))
    assert done.returncode == 2
    assert done.stdout.strip() == f"settings: FAIL: {settings}: API.Port: expected an integer, got str 'five thousand'"
    bad_key = write_settings(tmp_path, redis_server.address, name="badkey.yaml",
                             API={"SM2PrivateKey": "not base64!"})
    done = goinfer("check", "--yaml", str(bad_key))
    assert done.returncode == 1
    assert _lines(done)["SM2 key"].startswith("SM2 key: FAIL: ")
    assert "not valid standard base64" in done.stdout
    missing = goinfer("check", "--yaml", str(tmp_path / "missing.yaml"))
    assert missing.returncode == 2 and "file not found" in missing.stdout
