"""`goinfer init`: a new project with fresh credentials that serves and answers as written."""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from goinfer.client import Client
from goinfer.crypto.sm2 import public_key_from_private_b64, public_key_to_hex
from goinfer.published import published_keys
from goinfer.settings import load_settings

from conftest import ROOT, ProcessFactory, free_port, process_env, start_redis, stop_redis

GOINFER_SCRIPT = str(Path(sys.executable).parent / "goinfer")


def goinfer(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "goinfer", *args], capture_output=True, text=True, cwd=cwd,
                          env=process_env(env), timeout=60)


def printed(done: subprocess.CompletedProcess) -> dict[str, str]:
    """The credentials `goinfer init` printed, by label."""
    labels = ("URL", "appId", "appSecret", "SM2 private key", "SM2 public key")
    found = {}
    for line in done.stdout.splitlines():
        for label in labels:
            if line.startswith(f"  {label} "):
                found[label] = line[len(label) + 2:].split()[0]
    return found


def test_init_writes_a_project_with_fresh_credentials(tmp_path):
    done = goinfer("init", "svc", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "svc"
    assert sorted(p.name for p in folder.iterdir()) == ["mymodel.py", "settings.yaml"]
    assert stat.S_IMODE((folder / "settings.yaml").stat().st_mode) == 0o600  # it holds secrets

    settings = load_settings(str(folder / "settings.yaml"), environ={})
    shown = printed(done)
    assert shown["URL"] == "http://127.0.0.1:5000/api/mymodel"
    assert settings.api.addr == "127.0.0.1" and settings.api.port == 5000
    assert settings.api.app_id_secret == {shown["appId"]: shown["appSecret"]}
    assert len(shown["appId"]) == 32 and shown["appId"] == shown["appId"].upper()
    int(shown["appId"], 16)
    assert settings.api.sm2_private_key == shown["SM2 private key"]
    public = public_key_from_private_b64(settings.api.sm2_private_key)  # a valid key...
    assert public_key_to_hex(public, prefix=True) == shown["SM2 public key"]  # ...whose public key was printed
    assert len(settings.server.redis_passwd) == 32 and settings.server.redis_passwd not in done.stdout
    assert settings.models == ("mymodel:MyModel",)
    assert settings.warnings == () and published_keys(settings) == ()
    for secret in (shown["appSecret"], shown["SM2 private key"]):
        assert done.stdout.count(secret) == 1  # printed once
    assert "cd svc && " in done.stdout and " up --yaml settings.yaml" in done.stdout
    assert " call /api/mymodel --data '{\"text\": \"hello\"}' --yaml settings.yaml" in done.stdout

    again = goinfer("init", "svc2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    other = load_settings(str(tmp_path / "svc2" / "settings.yaml"), environ={})
    assert other.api.sm2_private_key != settings.api.sm2_private_key
    assert other.api.app_id_secret.keys() != settings.api.app_id_secret.keys()
    assert set(other.api.app_id_secret.values()) != set(settings.api.app_id_secret.values())
    assert other.server.redis_passwd != settings.server.redis_passwd


def test_init_defaults_to_the_current_folder_and_never_overwrites(tmp_path):
    done = goinfer("init", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "cd " not in done.stdout
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = goinfer("init", ".", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        "goinfer: error: settings.yaml already exists: goinfer init never overwrites a file; "
        "choose another folder or move it away"]
    assert again.stdout == ""
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "mymodel.py").write_text("# mine\n")
    half = goinfer("init", "half", cwd=tmp_path)
    assert half.returncode == 2 and "half/mymodel.py already exists" in half.stderr
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["mymodel.py"]  # nothing written
    (tmp_path / "afile").write_text("")
    assert goinfer("init", "afile", cwd=tmp_path).returncode == 2


def _keys(document: object, prefix: str = "") -> set[str]:
    if not isinstance(document, dict):
        return set()
    keys = set()
    for key, value in document.items():
        keys.add(prefix + str(key))
        if key not in ("AppIdSecret", "Customer"):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def test_init_settings_have_every_key_of_the_shipped_file(tmp_path):
    assert goinfer("init", cwd=tmp_path).returncode == 0
    written = yaml.safe_load((tmp_path / "settings.yaml").read_text())
    shipped = yaml.safe_load((ROOT / "config" / "settings.yaml").read_text())
    assert _keys(written) == _keys(shipped)
    mine = load_settings(str(tmp_path / "settings.yaml"), environ={})
    theirs = load_settings(str(ROOT / "config" / "settings.yaml"), environ={})
    differ = {"sm2_private_key", "app_id_secret", "redis_passwd", "queue_name"}
    for section in ("api", "server"):
        for name, value in vars(getattr(theirs, section)).items():
            if name not in differ:
                assert getattr(getattr(mine, section), name) == value, name
    assert mine.err_code == theirs.err_code


def test_an_initialised_project_serves_its_model(tmp_path):
    """init, then `goinfer up` and `goinfer call` from the project folder, as the README says.

    Redis and the port come from the environment (a test redis-server with a password), which
    also checks that GOINFER_ variables reach every process `goinfer up` starts.
    """
    folder = tmp_path / "svc"
    assert goinfer("init", str(folder), cwd=tmp_path).returncode == 0
    password = "0123" + secrets.token_hex(8)  # a leading zero: kept as text all the way
    redis_server = start_redis(password=password)
    env = {"GOINFER_SERVER__REDISSERVER": redis_server.address, "GOINFER_SERVER__REDISPASSWD": password,
           "GOINFER_API__PORT": str(free_port()), "GOINFER_SERVER__MAXWORKERS": "1",
           "PYTHONPATH": ""}  # mymodel is found in the working directory, nowhere else
    processes = ProcessFactory(folder)
    try:
        up = processes.start("up", "--yaml", "settings.yaml", program=[GOINFER_SCRIPT], env=env)
        settings = load_settings(str(folder / "settings.yaml"), environ=env)
        app_id, secret = next(iter(settings.api.app_id_secret.items()))
        client = Client(f"http://127.0.0.1:{env['GOINFER_API__PORT']}", app_id, secret, sign_type="SHA256")

        def answers() -> bool:
            try:
                return client.call("/api/mymodel", {"text": "x"})["length"] == 1
            except OSError:
                return False

        up.wait_while_running(answers, 90, "the initialised project answering")
        done = subprocess.run([GOINFER_SCRIPT, "call", "/api/mymodel", "--data", '{"text": "hello"}',
                               "--yaml", "settings.yaml"], capture_output=True, text=True, cwd=folder,
                              env=process_env(env), timeout=60)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert (answer["text"], answer["length"], answer["msg"]) == ("hello", 5, "success")
        refused = subprocess.run([GOINFER_SCRIPT, "call", "/api/mymodel", "--data", "{}", "--yaml", "settings.yaml"],
                                 capture_output=True, text=True, cwd=folder, env=process_env(env), timeout=60)
        assert refused.returncode == 1 and refused.stderr.strip() == "error 1001: api entry fail : need text: a string"
        assert up.stop(signal.SIGTERM, timeout=60) == 0
        assert "WARNING" not in up.output and "Traceback" not in up.output
        assert "started a private redis-server" not in up.output  # it used the test redis-server
        for value in (password, secret, settings.api.sm2_private_key):
            assert value not in up.output
    finally:
        processes.cleanup()
        stop_redis(redis_server)


@pytest.mark.skipif(not os.access(GOINFER_SCRIPT, os.X_OK), reason="the goinfer console script is not installed")
def test_init_prints_commands_that_run_this_goinfer(tmp_path):
    done = subprocess.run([GOINFER_SCRIPT, "init", "svc"], capture_output=True, text=True, cwd=tmp_path,
                          env=process_env({"PATH": "/usr/bin:/bin"}), timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"cd svc && {GOINFER_SCRIPT} up --yaml settings.yaml" in done.stdout  # not on PATH: its full path
