"""Settings: go-infer's file loads unchanged; bad files are one clear line and exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from goinfer.errors import DEFAULT_ERROR_CODES
from goinfer.settings import SettingsError, load_settings, parse_settings

from conftest import ROOT, process_env

# go-infer's examples/config/settings.yaml, verbatim.
GO_INFER_SETTINGS = """
# HTTP 服务端参数
API:
    Port: 5000
    Addr: 0.0.0.0
    SM2PrivateKey: "JShsBOJL0RgPAoPttEB1hgtPAvCikOl0V1oTOYL7k5U=" # SM2私钥
    AppIdSecret: { # 接口调用分配的 appid 和 sevret
        "3EA25569454745D01219080B779F021F" : "41DF0E6AE27B5282C07EF5124642A352",
    }

# 推理服务队列的参数
Server:
    RedisServer: "127.0.0.1:7480"
    RedisPasswd: "e18ffb7484f4d69c2acb40008471a71c"
    QueueName: "goinfer-synchronous-asynchronous-queue"
    RequestQueueAmount: 1 # 请求队列数量，要启动相同数量的server
    MessageTimeout: 10 # 推理计算最大等待时间
    MaxWorkers: 8 # 模型推理最大并发数

# 自定义参数
Customer: { # 以下 key-value 为用户自定义使用
    # 预训练模型路径
    "BertModelPath" : "export/outputs/saved-model",
    "BertVocabPath" : "export/outputs/vocab.txt",
}
"""


def test_go_infer_settings_load_unchanged():
    settings = parse_settings(GO_INFER_SETTINGS, "go-infer.yaml")
    assert settings.api.port == 5000 and settings.api.addr == "0.0.0.0"
    assert settings.api.app_id_secret == {"3EA25569454745D01219080B779F021F": "41DF0E6AE27B5282C07EF5124642A352"}
    assert settings.server.redis_server == "127.0.0.1:7480"
    assert settings.server.queue_name == "goinfer-synchronous-asynchronous-queue"
    server = settings.server
    assert (server.request_queue_amount, server.message_timeout, server.max_workers) == (1, 10, 8)
    assert settings.customer["BertVocabPath"] == "export/outputs/vocab.txt"
    # Keys the file leaves out get the defaults of go-infer's shipped settings.yaml.
    assert settings.api.request_timestamp_diff == 300
    assert settings.api.allow_sign_plain == ()
    assert settings.err_code == DEFAULT_ERROR_CODES
    assert settings.error("QueueTimeout").code == 9997


def test_shipped_settings_file_loads():
    settings = load_settings(str(ROOT / "config" / "settings.yaml"))
    assert settings.models == ("goinfer.models.echo:Echo",)
    for name, code in DEFAULT_ERROR_CODES.items():
        assert settings.error(name) == code, name


def test_empty_file_gives_defaults():
    settings = parse_settings("", "empty.yaml")
    assert settings.api.port == 5000 and settings.server.max_workers == 8


def test_error_codes_can_be_overridden():
    settings = parse_settings("ErrCode:\n  QueueTimeout: {code: 1234, msg: slow}\n  InferFail: {msg: boom}\n")
    assert settings.error("QueueTimeout").code == 1234
    assert (settings.error("InferFail").code, settings.error("InferFail").msg) == (9998, "boom")


@pytest.mark.parametrize("text, message", [
    ("API: [1, 2]", "x.yaml: API: expected a mapping, got a list"),
    ("API:\n  Port: eighty", "x.yaml: API.Port: expected an integer, got str 'eighty'"),
    ("API:\n  Port: 70000", "x.yaml: API.Port: must be at most 65535, got 70000"),
    ("API:\n  Port: true", "x.yaml: API.Port: expected an integer, got a boolean True"),
    ("Server:\n  MessageTimeout: -1", "x.yaml: Server.MessageTimeout: must be a positive number, got -1"),
    ("Server:\n  RequestQueueAmount: 0", "x.yaml: Server.RequestQueueAmount: must be at least 1, got 0"),
    ("Server:\n  QueueName: ''", "x.yaml: Server.QueueName: must not be empty"),
    ("Server:\n  RedisServer: 'redis+sentinel://:pw@h1:26379,h2'",
     "x.yaml: Server.RedisServer: a redis+sentinel:// address must end with the master's name"),
    ("Server:\n  RedisServer: 'redis+cluster://:pw@h1:70a,h2'",
     "x.yaml: Server.RedisServer: names a node with a bad port"),
    ("Server:\n  RedisServer: 'redis+sentinel://h1/m/zero'", "x.yaml: Server.RedisServer: the database number"),
    ("Server:\n  RedisServer: 'redis+cluster://'", "x.yaml: Server.RedisServer: names no host"),
    ("API:\n  AppIdSecret: [a]", "x.yaml: API.AppIdSecret: expected a mapping of appId to secret, got a list"),
    ("ErrCode:\n  Custom: {msg: x}", "x.yaml: ErrCode.Custom.code: missing"),
    ("Models: [echo]", "x.yaml: Models: expected 'package.module:ClassName', got 'echo'"),
    ("API: {Port: 1", "x.yaml: not valid YAML at line 1, column 14"),
    ("- a\n- b", "x.yaml: expected a mapping of sections, got a list"),
])
def test_bad_values_are_named(text, message):
    with pytest.raises(SettingsError) as bad:
        parse_settings(text, "x.yaml")
    assert str(bad.value).startswith(message), str(bad.value)
    assert "\n" not in str(bad.value)


def test_unknown_key_is_warned_with_a_suggestion(caplog):
    parse_settings("Server:\n  MaxWorker: 3\n", "x.yaml")
    assert "x.yaml: Server.MaxWorker: unknown key, ignored; did you mean Server.MaxWorkers?" in caplog.text


def run_goinfer(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "goinfer", *args], cwd=cwd, env=process_env(),
                          capture_output=True, text=True, timeout=60)


BAD_FILES = [
    (None, "missing.yaml: file not found"),
    ("API: {Port: 1", "not valid YAML"),
    ("API:\n  Port: abc\n", "API.Port: expected an integer"),
]
BAD_MODELS = [
    ("Models: ['nosuchmodule:Thing']\n", "cannot import module 'nosuchmodule'"),
    ("Models: ['goinfer.models.echo:Nope']\n", "has no 'Nope'"),
    ("Models: ['sample_models:WrongInferSignature']\n", "infer must accept infer(self, request_id, params)"),
]


# The dispatcher's parent never imports model code, so only the HTTP tier checks Models: at start
# (its workers report a bad path: test_dispatcher_reports_a_bad_model_path).
@pytest.mark.parametrize("command, content, expected",
                         [("http", *case) for case in BAD_FILES + BAD_MODELS]
                         + [("server", *case) for case in BAD_FILES])
def test_commands_refuse_bad_settings_with_one_line(tmp_path, command, content, expected):
    path = tmp_path / "missing.yaml"
    if content is not None:
        path.write_text(content)
    args = [command] + (["0"] if command == "server" else []) + ["--yaml", str(path)]
    result = run_goinfer(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr


def test_server_queue_number_is_checked(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("Server:\n  RequestQueueAmount: 2\n")
    for bad in ("2", "-1", "x"):
        result = run_goinfer("server", bad, "--yaml", str(path), cwd=tmp_path)
        assert result.returncode == 2, (bad, result.stderr)
        assert "Usage:" in result.stderr and "Traceback" not in result.stderr


def test_help_and_version(tmp_path):
    result = run_goinfer("--version", cwd=tmp_path)
    assert result.returncode == 0 and "goinfer, version" in result.stdout
    for command in ("http", "server", "up"):
        result = run_goinfer(command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "--yaml PATH" in result.stdout
        assert "config/settings.yaml" in result.stdout
    assert "RequestQueueAmount" in run_goinfer("server", "--help", cwd=tmp_path).stdout


def test_dispatcher_reports_a_bad_model_path(tmp_path, redis_server):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(f"""
        Server: {{RedisServer: "{redis_server.address}", MaxWorkers: 1}}
        Models: ['nosuchmodule:Thing']
    """))
    result = run_goinfer("server", "0", "--yaml", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot import module 'nosuchmodule'" in result.stderr


def test_shipped_settings_show_every_default():
    """config/settings.yaml documents each key with its default: the two must not drift apart."""
    from dataclasses import fields

    from goinfer.settings import ApiSettings, ServerSettings

    text = (ROOT / "config" / "settings.yaml").read_text()
    shipped = load_settings(str(ROOT / "config" / "settings.yaml"))
    credentials = {"sm2_private_key", "app_id_secret", "redis_passwd"}
    for section, defaults in ((shipped.api, ApiSettings()), (shipped.server, ServerSettings())):
        for field in fields(defaults):
            if field.name not in credentials:
                assert getattr(section, field.name) == getattr(defaults, field.name), field.name
    for key in ("HttpWorkers", "BatchSize", "MaxQueueLength", "ClaimIdleMs", "MaxDeliveries", "RejectReplay",
                "ShutdownDrainS", "ShutdownGraceS", "BodyReadTimeoutS", "DeadLetterMaxLength", "MetricsPort"):
        assert f"    {key}:" in text, key


def test_model_entries_as_mappings_carry_how_each_model_is_served():
    settings = parse_settings(textwrap.dedent("""
        Models:
          - goinfer.models.echo:Echo
          - Class: goinfer.models.tensorflow:SavedModel
            ApiPath: /api/tiny
            ModelBasePath: models/tiny
            ModelVersion: 3
            Warmup: [{x: [1, 2]}]
            Cache: {Size: 100, TTLS: 60}
            Signature: serving_default
    """))
    assert settings.models == ("goinfer.models.echo:Echo", "goinfer.models.tensorflow:SavedModel@/api/tiny")
    config = settings.model_config("goinfer.models.tensorflow:SavedModel@/api/tiny")
    assert config is not None and settings.model_config("goinfer.models.echo:Echo") is None
    assert (config.base_path, config.version, config.warmup) == ("models/tiny", 3, ({"x": [1, 2]},))
    assert (config.cache.size, config.cache.ttl_s, config.cache.enabled) == (100, 60.0, True)
    assert config.options == {"Signature": "serving_default"}


@pytest.mark.parametrize("text, message", [
    ("Models: [{ApiPath: /x}]", "a mapping entry needs Class"),
    ("Models: [{Class: a:B, ModelVersion: 2}]", "ModelVersion pins a version of ModelBasePath, which is not set"),
    ("Models: [{Class: a:B, ModelBasePath: m, ModelVersion: -1}]", "ModelVersion must be at least 0"),
    ("Models: [{Class: a:B, Cache: {Sizes: 1}}]", "Cache has no key 'Sizes'"),
    ("Models: [{Class: a:B, ApiPath: x}]", "ApiPath must start with '/'"),
    ("Models: [{Class: a:B, Warmup: {x: 1}}]", "Warmup must be a list of params mappings"),
    ("Models: [a:B, {Class: a:B}]", "'a:B' is listed twice"),
    ("Server: {Devices: [cpu, 1]}", "\"cpu\" cannot be listed with GPUs"),
    ("Server: {Devices: [gpu0]}", "expected \"cpu\" or a list of GPU numbers"),
])
def test_bad_model_entries_and_devices_are_named(text, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        parse_settings(text)


@pytest.mark.parametrize("value, devices", [("cpu", ("cpu",)), ("[0, 1]", ("0", "1")), ("1", ("1",)),
                                            ('"0,2"', ("0", "2")), ("[]", ())])
def test_devices_spellings(value, devices):
    assert parse_settings(f"Server: {{Devices: {value}}}").server.devices == devices
