"""go-infer's settings.yaml, read once into typed, frozen objects that are passed down.

A go-infer deployment's file must load unchanged, so the YAML keys are go-infer's own (`API.Port`,
`Server.RedisServer`, ...). Keys goinfer adds sit beside them with defaults. Every problem is
reported as one line that names the file and the key, because an operator reading a start-up
failure should not have to read a traceback.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import yaml

from goinfer.errors import DEFAULT_ERROR_CODES, ErrorCode

log = logging.getLogger("goinfer.settings")

DEFAULT_SETTINGS_PATH = "config/settings.yaml"


class SettingsError(Exception):
    """A settings file that cannot be used; its message is the one line shown to the operator."""

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.key = key


@dataclass(frozen=True)
class ApiSettings:
    """The `API:` section: what the HTTP tier listens on and whom it trusts."""

    port: int = 5000
    addr: str = "0.0.0.0"
    sm2_private_key: str = field(default="", repr=False)
    app_id_secret: Mapping[str, str] = field(default_factory=dict, repr=False)
    request_timestamp_diff: float = 300.0
    allow_sign_plain: tuple[str, ...] = ()
    max_body_bytes: int = 16 * 1024 * 1024
    max_json_depth: int = 512
    http_workers: int = 1
    body_read_timeout_s: float = 30.0
    reject_replay: bool = False
    shutdown_drain_s: float = 1.0
    access_log: bool = True


@dataclass(frozen=True)
class ServerSettings:
    """The `Server:` section: the Redis both tiers share and how dispatchers run."""

    redis_server: str = "127.0.0.1:7480"
    redis_passwd: str = field(default="", repr=False)
    queue_name: str = "goinfer-synchronous-asynchronous-queue"
    request_queue_amount: int = 1
    message_timeout: float = 10.0
    max_workers: int = 8
    batch_size: int = 16
    batch_timeout_ms: float = 5.0
    max_queue_length: int = 10000
    claim_idle_ms: int = 3000
    max_deliveries: int = 3
    shutdown_grace_s: float = 30.0
    dead_letter_max_length: int = 10000
    metrics_port: int = 0  # 0: no dispatcher /metrics; else `server N` listens on MetricsPort + N
    metrics_addr: str = "0.0.0.0"
    heartbeat_interval_s: float = 5.0  # the heartbeat key lives 3 intervals
    # More worker deaths than this within the window stop the dispatcher (exit status 1), so a
    # crash-looping model fails loudly to systemd or Kubernetes instead of restarting forever.
    worker_restart_limit: int = 5
    worker_restart_window_s: float = 60.0


@dataclass(frozen=True)
class Settings:
    """Everything goinfer reads from one settings file."""

    path: str = DEFAULT_SETTINGS_PATH
    api: ApiSettings = field(default_factory=ApiSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    err_code: Mapping[str, ErrorCode] = field(default_factory=lambda: dict(DEFAULT_ERROR_CODES))
    customer: Mapping[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] = ()

    def error(self, name: str) -> ErrorCode:
        """The code and message configured for one of the `ErrCode` names."""
        return self.err_code[name]


# --- value checks -------------------------------------------------------------------------------

Check = Callable[[Any], Any]


class _Bad(ValueError):
    """A value of the wrong type or range; its text completes "<file>: <key>: ..."."""


def _int(minimum: int | None = None, maximum: int | None = None) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"expected an integer, got {_shown(value)}")
        if minimum is not None and value < minimum:
            raise _Bad(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise _Bad(f"must be at most {maximum}, got {value}")
        return value

    return check


def _number(positive: bool = False) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(f"expected a number, got {_shown(value)}")
        if not math.isfinite(value) or (positive and value <= 0) or value < 0:
            raise _Bad(f"must be a {'positive' if positive else 'non-negative'} number, got {value}")
        return float(value)

    return check


def _string(value: Any) -> str:
    # yaml.v3 decodes a bare scalar such as `RedisPasswd: 12345` into a Go string; do the same.
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise _Bad(f"expected a string, got {_shown(value)}")
    return value if isinstance(value, str) else str(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_shown(value)}")
    return value


def _string_map(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"expected a mapping of appId to secret, got {_shown(value)}")
    return {_string(k): _string(v) for k, v in value.items()}


def _string_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Bad(f"expected a list of strings, got {_shown(value)}")
    return tuple(_string(item) for item in value)


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _model_paths(value: Any) -> tuple[str, ...]:
    paths = _string_list(value)
    for path in paths:
        if not _IMPORT_PATH.match(path):
            raise _Bad(f"expected 'package.module:ClassName', got {path!r}")
    return paths


def _shown(value: Any) -> str:
    kind = {bool: "a boolean", type(None): "nothing", dict: "a mapping", list: "a list"}.get(
        type(value), type(value).__name__
    )
    text = repr(value)
    return f"{kind} {text}" if len(text) <= 40 and kind not in ("nothing",) else kind


# --- the schema: go-infer's YAML key -> our attribute and its check ----------------------------

_API_KEYS: dict[str, tuple[str, Check]] = {
    "Port": ("port", _int(1, 65535)),
    "Addr": ("addr", _string),
    "SM2PrivateKey": ("sm2_private_key", _string),
    "AppIdSecret": ("app_id_secret", _string_map),
    "RequestTimestampDiff": ("request_timestamp_diff", _number()),
    "AllowSignPlain": ("allow_sign_plain", _string_list),
    "MaxBodyBytes": ("max_body_bytes", _int(1024)),
    "MaxJsonDepth": ("max_json_depth", _int(2, 10000)),
    "HttpWorkers": ("http_workers", _int(1, 256)),
    "BodyReadTimeoutS": ("body_read_timeout_s", _number(positive=True)),
    "RejectReplay": ("reject_replay", _bool),
    "ShutdownDrainS": ("shutdown_drain_s", _number()),
    "AccessLog": ("access_log", _bool),
}

_SERVER_KEYS: dict[str, tuple[str, Check]] = {
    "RedisServer": ("redis_server", _string),
    "RedisPasswd": ("redis_passwd", _string),
    "QueueName": ("queue_name", _string),
    "RequestQueueAmount": ("request_queue_amount", _int(1, 1024)),
    "MessageTimeout": ("message_timeout", _number(positive=True)),
    "MaxWorkers": ("max_workers", _int(1, 1024)),
    "BatchSize": ("batch_size", _int(1, 4096)),
    "BatchTimeoutMs": ("batch_timeout_ms", _number()),
    "MaxQueueLength": ("max_queue_length", _int(1)),
    "ClaimIdleMs": ("claim_idle_ms", _int(500)),
    "MaxDeliveries": ("max_deliveries", _int(1, 100)),
    "ShutdownGraceS": ("shutdown_grace_s", _number()),
    "DeadLetterMaxLength": ("dead_letter_max_length", _int(1)),
    "MetricsPort": ("metrics_port", _int(0, 65535)),
    "MetricsAddr": ("metrics_addr", _string),
    "HeartbeatIntervalS": ("heartbeat_interval_s", _number(positive=True)),
    "WorkerRestartLimit": ("worker_restart_limit", _int(0)),
    "WorkerRestartWindowS": ("worker_restart_window_s", _number(positive=True)),
}

_SECTIONS = ("API", "Server", "ErrCode", "Customer", "Models")


def load_settings(path: str = DEFAULT_SETTINGS_PATH) -> Settings:
    """Read and check a settings file; raise SettingsError with a one-line reason if unusable."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise SettingsError(path, None, "file not found") from None
    except OSError as exc:
        raise SettingsError(path, None, f"cannot read: {exc.strerror or exc}") from None
    return parse_settings(text, path)


def parse_settings(text: bytes | str, path: str = "<settings>") -> Settings:
    """Build Settings from YAML text; `path` is only used in messages."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SettingsError(path, None, f"not valid YAML{where}: {problem}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise SettingsError(path, None, f"expected a mapping of sections, got {_shown(document)}")
    _warn_unknown(path, "", document, _SECTIONS)

    api = _section(path, document, "API", _API_KEYS, ApiSettings)
    server = _section(path, document, "Server", _SERVER_KEYS, ServerSettings)
    if not server.queue_name:
        raise SettingsError(path, "Server.QueueName", "must not be empty")
    return Settings(
        path=path,
        api=api,
        server=server,
        err_code=_error_codes(path, document.get("ErrCode")),
        customer=_customer(path, document.get("Customer")),
        models=_checked(path, "Models", _model_paths, document.get("Models")),
    )


def _section(path: str, document: dict, name: str, keys: dict[str, tuple[str, Check]], cls: type):
    raw = document.get(name)
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SettingsError(path, name, f"expected a mapping, got {_shown(raw)}")
    _warn_unknown(path, f"{name}.", raw, keys)
    values = {
        attr: _checked(path, f"{name}.{key}", check, raw[key])
        for key, (attr, check) in keys.items()
        if key in raw and raw[key] is not None
    }
    return cls(**values)


def _checked(path: str, key: str, check: Check, value: Any) -> Any:
    try:
        return check(value)
    except _Bad as exc:
        raise SettingsError(path, key, str(exc)) from None


def _error_codes(path: str, raw: Any) -> dict[str, ErrorCode]:
    codes = dict(DEFAULT_ERROR_CODES)
    if raw is None:
        return codes
    if not isinstance(raw, dict):
        raise SettingsError(path, "ErrCode", f"expected a mapping, got {_shown(raw)}")
    for name, entry in raw.items():
        key = f"ErrCode.{name}"
        if not isinstance(entry, dict):
            raise SettingsError(path, key, f"expected {{code: <int>, msg: <text>}}, got {_shown(entry)}")
        default = codes.get(str(name))
        if "code" not in entry and default is None:
            raise SettingsError(path, f"{key}.code", "missing")
        code = _checked(path, f"{key}.code", _int(), entry.get("code", default.code if default else 0))
        msg = _checked(path, f"{key}.msg", _string, entry.get("msg", default.msg if default else ""))
        codes[str(name)] = ErrorCode(code, msg)
    return codes


def _customer(path: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SettingsError(path, "Customer", f"expected a mapping, got {_shown(raw)}")
    return {str(k): v for k, v in raw.items()}


def _warn_unknown(path: str, prefix: str, raw: dict, known) -> None:
    """Unknown keys are ignored as go-infer's YAML decoder ignores them, but a typo is named."""
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            log.warning("%s: %s%s: unknown key, ignored%s", path, prefix, key, hint)
