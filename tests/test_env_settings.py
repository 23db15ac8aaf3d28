"""Settings from the environment: GOINFER_<SECTION>__<KEY> overrides the file, which overrides defaults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from goinfer.settings import SettingsError, load_settings, parse_settings

from conftest import process_env, write_settings

FILE = textwrap.dedent("""
    API:
        Port: 6000
        AppIdSecret: {"FILEAPP": "file-secret"}
    Server:
        RedisPasswd: from-the-file
        MaxWorkers: 3
    Customer:
        Suffix: "!"
        Threads: 2
""")


def parse(environ: dict[str, str], text: str = FILE):
    return parse_settings(text, "x.yaml", environ)


def test_strings_are_kept_as_written():
    """YAML would read 0123 as 83 and yes as True; a password must stay what the operator typed."""
    for text in ("0123", "yes", "null", "1e3", "  spaced  ", "", "[not, a, list]", "a: b"):
        settings = parse({"GOINFER_SERVER__REDISPASSWD": text, "GOINFER_API__ADDR": text})
        assert settings.server.redis_passwd == text
        assert settings.api.addr == text


def test_numbers_and_booleans_are_typed():
    settings = parse({"GOINFER_API__PORT": "8080", "GOINFER_SERVER__MESSAGETIMEOUT": "2.5",
                      "GOINFER_API__REJECTREPLAY": "true", "GOINFER_API__ACCESSLOG": "false"})
    assert settings.api.port == 8080
    assert settings.server.message_timeout == 2.5
    assert settings.api.reject_replay is True and settings.api.access_log is False


def test_mappings_and_lists_keep_their_strings():
    settings = parse({
        "GOINFER_API__APPIDSECRET": '{"APP1": "0123", APP2: yes}',
        "GOINFER_API__ALLOWSIGNPLAIN": "APP1, APP2",
        "GOINFER_MODELS": "goinfer.models.echo:Echo,sample_models:Greeter",
    })
    assert settings.api.app_id_secret == {"APP1": "0123", "APP2": "yes"}
    assert settings.api.allow_sign_plain == ("APP1", "APP2")
    assert settings.models == ("goinfer.models.echo:Echo", "sample_models:Greeter")
    as_yaml = parse({"GOINFER_API__ALLOWSIGNPLAIN": "[APP3]", "GOINFER_MODELS": "- a.b:C\n- d:E"})
    assert as_yaml.api.allow_sign_plain == ("APP3",) and as_yaml.models == ("a.b:C", "d:E")


def test_environment_beats_file_beats_defaults():
    settings = parse({"GOINFER_API__PORT": "7000", "GOINFER_SERVER__REDISPASSWD": "from-the-env"})
    assert settings.api.port == 7000  # environment over file
    assert settings.server.redis_passwd == "from-the-env"
    assert settings.server.max_workers == 3  # file over default
    assert settings.api.app_id_secret == {"FILEAPP": "file-secret"}
    assert settings.server.claim_idle_ms == 3000  # default
    assert settings.environment == ("GOINFER_API__PORT", "GOINFER_SERVER__REDISPASSWD")
    assert parse({}).api.port == 6000
    replaced = parse({"GOINFER_API__APPIDSECRET": "{NEWAPP: new-secret}"})
    assert replaced.api.app_id_secret == {"NEWAPP": "new-secret"}  # a mapping is replaced whole


def test_sections_and_keys_match_in_any_case():
    for name in ("GOINFER_SERVER__REDISPASSWD", "GOINFER_Server__RedisPasswd", "goinfer_server__redispasswd"):
        assert parse({name: "pw"}).server.redis_passwd == "pw", name


def test_error_codes_and_customer_values():
    settings = parse({
        "GOINFER_ERRCODE__QUEUETIMEOUT": "{code: 1234, msg: too slow}",
        "GOINFER_CUSTOMER__SUFFIX": "0123",  # replaces a string: kept as text
        "GOINFER_CUSTOMER__THREADS": "4",  # replaces a number: read as YAML
        "GOINFER_CUSTOMER__ModelPath": "/srv/model.bin",  # a new key, as spelt
        "GOINFER_CUSTOMER__LABELS": "[a, b]",
    })
    assert (settings.error("QueueTimeout").code, settings.error("QueueTimeout").msg) == (1234, "too slow")
    assert settings.customer["Suffix"] == "0123"
    assert settings.customer["Threads"] == 4
    assert settings.customer["ModelPath"] == "/srv/model.bin"
    assert settings.customer["LABELS"] == ["a", "b"]


def test_unknown_variables_are_warned_and_kept(caplog):
    settings = parse({"GOINFER_SERVER__REDISPASWD": "x", "GOINFER_APII__PORT": "1", "GOINFER_ERRCODE__NOPE": "{}"})
    assert settings.server.redis_passwd == "from-the-file"
    expected = [
        "environment variable GOINFER_APII__PORT: unknown section 'APII', ignored; did you mean GOINFER_API__PORT?",
        "environment variable GOINFER_ERRCODE__NOPE: ErrCode has no key 'NOPE', ignored",
        "environment variable GOINFER_SERVER__REDISPASWD: Server has no key 'REDISPASWD', ignored; "
        "did you mean GOINFER_SERVER__REDISPASSWD?",
    ]
    assert list(settings.warnings) == expected
    for line in expected:
        assert line in caplog.text
    assert settings.environment == ()


def test_other_goinfer_variables_are_not_settings(caplog):
    settings = parse({"GOINFER_LOG_LEVEL": "DEBUG", "GOINFER_TEST_TAG": "a", "GOINFER_CACHE": "/tmp",
                      "GOINFERX__PORT": "1", "PATH": "/bin"})
    assert settings.warnings == () and settings.environment == ()
    assert caplog.text == ""


@pytest.mark.parametrize("environ, message", [
    ({"GOINFER_API__PORT": "abc"},
     "environment variable GOINFER_API__PORT: API.Port: expected an integer, got str 'abc'"),
    ({"GOINFER_API__PORT": ""}, "environment variable GOINFER_API__PORT: API.Port: expected an integer, got nothing"),
    ({"GOINFER_API__REJECTREPLAY": "maybe"},
     "environment variable GOINFER_API__REJECTREPLAY: API.RejectReplay: expected true or false, got str 'maybe'"),
    ({"GOINFER_SERVER__MAXWORKERS": "[1"}, "environment variable GOINFER_SERVER__MAXWORKERS: Server.MaxWorkers: "
                                            "not valid YAML"),
    ({"GOINFER_MODELS": "nocolon"},
     "environment variable GOINFER_MODELS: Models: expected 'package.module:ClassName', got 'nocolon'"),
])
def test_bad_values_name_the_variable(environ, message):
    with pytest.raises(SettingsError) as bad:
        parse(environ)
    assert str(bad.value).startswith(message), str(bad.value)
    assert "\n" not in str(bad.value)


@pytest.mark.parametrize("value", ["s3cr3t-not-a-mapping", "{APP: [s3cr3t-in-a-list]}", "{APP: s3cr3t-unclosed"])
def test_a_bad_secret_is_not_echoed(value):
    with pytest.raises(SettingsError) as bad:
        parse({"GOINFER_API__APPIDSECRET": value})
    assert str(bad.value).startswith("environment variable GOINFER_API__APPIDSECRET: API.AppIdSecret: ")
    assert "s3cr3t" not in str(bad.value)


def test_a_bad_secret_in_the_file_is_not_echoed():
    for text in ('API: {AppIdSecret: "s3cr3t-text"}', "API: {AppIdSecret: {APP: [s3cr3t]}}",
                 "Server: {RedisPasswd: [s3cr3t]}", "API: {SM2PrivateKey: {k: s3cr3t}}"):
        with pytest.raises(SettingsError) as bad:
            parse_settings(text, "x.yaml")
        assert "value not shown" in str(bad.value) and "s3cr3t" not in str(bad.value), str(bad.value)


def test_load_settings_reads_the_process_environment(tmp_path, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text(FILE)
    monkeypatch.setenv("GOINFER_API__PORT", "6553")
    assert load_settings(str(path)).api.port == 6553
    assert load_settings(str(path), environ={}).api.port == 6000


def goinfer(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "goinfer", *args], capture_output=True, text=True,
                          env=process_env(env), timeout=60)


def test_check_fails_on_an_unknown_variable_and_shows_no_secret(tmp_path, redis_server):
    settings = write_settings(tmp_path, redis_server.address)
    env = {"GOINFER_SERVER__REDISPASWD": "pw-typo-not-shown",
           "GOINFER_API__APPIDSECRET": "{ENVAPP: env-secret-not-shown}"}
    done = goinfer("check", "--yaml", str(settings), env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == (
        "settings: FAIL: environment variable GOINFER_SERVER__REDISPASWD: Server has no key 'REDISPASWD', "
        "ignored; did you mean GOINFER_SERVER__REDISPASSWD?")
    assert "clients: ok (1 appIds" in done.stdout  # the variable's mapping replaced the file's two
    for secret in ("pw-typo-not-shown", "env-secret-not-shown"):
        assert secret not in done.stdout + done.stderr
    good = goinfer("check", "--yaml", str(settings), env={"GOINFER_SERVER__MAXWORKERS": "1"})
    assert good.returncode == 0, good.stdout + good.stderr
    assert "from the environment: GOINFER_SERVER__MAXWORKERS" in good.stdout


def test_a_bad_variable_stops_a_tier_with_one_line(tmp_path, redis_server):
    settings = write_settings(tmp_path, redis_server.address)
    done = goinfer("http", "--yaml", str(settings), env={"GOINFER_API__PORT": "eighty"})
    assert done.returncode == 2
    assert done.stderr.strip() == ("goinfer: error: environment variable GOINFER_API__PORT: API.Port: "
                                   "expected an integer, got str 'eighty'")
