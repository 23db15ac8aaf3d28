"""go-infer's settings.yaml, read once into typed, frozen objects that are passed down.

A go-infer deployment's file must load unchanged, so the YAML keys are go-infer's own (`API.Port`,
`Server.RedisServer`, ...). Keys goinfer adds sit beside them with defaults. Every problem is
reported as one line that names the file (or environment variable) and the key, because an
operator reading a start-up failure should not have to read a traceback; a secret's value is
never part of that line.

Any setting can also come from the environment, overriding the file, so that one file serves
every host and secrets need not be written into it (twelve-factor, as TorchServe, BentoML and
pydantic-settings do): `GOINFER_<SECTION>__<KEY>`, e.g. `GOINFER_SERVER__REDISPASSWD`, plus
`GOINFER_MODELS`. Precedence: environment, then file, then defaults.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from goinfer.errors import DEFAULT_ERROR_CODES, ErrorCode
from goinfer.queue import PRIORITIES

log = logging.getLogger("goinfer.settings")

DEFAULT_SETTINGS_PATH = "config/settings.yaml"

ENV_PREFIX = "GOINFER_"
ENV_SEPARATOR = "__"  # between section and key: GOINFER_API__PORT
ENV_MODELS = "GOINFER_MODELS"


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
    # Loopback unless the operator says otherwise: a service started with example credentials
    # must not be reachable from the network by accident.
    addr: str = "127.0.0.1"
    sm2_private_key: str = field(default="", repr=False)
    app_id_secret: Mapping[str, str] = field(default_factory=dict, repr=False)
    request_timestamp_diff: float = 300.0
    allow_sign_plain: tuple[str, ...] = ()
    # The largest body read. A body's signature check costs up to ~0.5 us per byte of pure
    # Python before anything is known about its sender, so this bounds what one unsigned request
    # can cost (the embedding example's largest legal request, 64 texts of 8 KiB, is ~0.5-3 MiB).
    max_body_bytes: int = 4 * 1024 * 1024
    max_json_depth: int = 512
    # Bodies up to this size that are cheap to check (valid UTF-8, at most a few hundred JSON
    # values) are checked on the event loop, in well under 1 ms; others in CheckProcesses child
    # processes (0: all on the event loop, as before), at most MaxUnverified of them being
    # received or checked at once, MaxUnverifiedPerClient per client address.
    inline_check_bytes: int = 16 * 1024
    check_processes: int = 1
    max_unverified: int = 16
    max_unverified_per_client: int = 4
    # Each model's api_entry runs in its own pool of this many threads, not on the event loop
    # (0: on the event loop, as before); at most MaxWaitingApiEntries requests per model wait
    # for a thread (then ApiEntryBusy).
    api_entry_threads: int = 4
    max_waiting_api_entries: int = 1000
    http_workers: int = 1
    body_read_timeout_s: float = 30.0
    reject_replay: bool = False
    shutdown_drain_s: float = 1.0
    access_log: bool = True
    # After each request and response, keep polling this many microseconds before the event loop
    # sleeps, while the machine has a core to spare (http/busy_poll.py); 0: sleep at once.
    busy_poll_us: int = 0
    # The priority lane of every request of these appIds (PRIORITIES: high, normal, low), instead
    # of the lane of its kind (live requests high, jobs normal, batch rows low).
    app_id_priority: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerSettings:
    """The `Server:` section: the Redis both tiers share and how dispatchers run."""

    redis_server: str = "127.0.0.1:7480"
    redis_passwd: str = field(default="", repr=False)
    # The HTTP tier counts a Redis connection dead when an answer takes longer than this (a
    # black-holed connection gives no error, only silence), and Redis unreachable meanwhile.
    redis_timeout_s: float = 3.0
    # The sentinels' own password, when RedisServer is a redis+sentinel:// URL (Redis's
    # `requirepass` for sentinels); the password in the URL, or RedisPasswd, is the master's.
    redis_sentinel_passwd: str = field(default="", repr=False)
    # RedisServer names nodes of a Redis Cluster (also implied by a redis+cluster:// URL).
    redis_cluster: bool = False
    # Each enqueue round trip ends with WAIT for this many replicas (at most EnqueueReplicasTimeoutMs):
    # a request counts as queued once they hold it. One they do not hold in time is still queued and
    # served, and counted and logged: a failover now could lose it. 0: no WAIT (see the docs).
    enqueue_replicas: int = 0
    enqueue_replicas_timeout_ms: int = 100
    queue_name: str = "goinfer-synchronous-asynchronous-queue"
    request_queue_amount: int = 1
    message_timeout: float = 10.0
    max_workers: int = 8
    batch_size: int = 16
    batch_timeout_ms: float = 5.0
    # While requests wait and no worker is idle, a worker takes as many as it expects to run in
    # this many ms (from its recent call times) and answers them in one round trip. 0: one at a time.
    take_ahead_ms: float = 1.0
    max_queue_length: int = 10000
    claim_idle_ms: int = 3000
    max_deliveries: int = 3
    # A model call running longer is stuck: its worker is stopped and its requests answered
    # InferFail. 0: MessageTimeout (no client waits longer). A model's max_infer_seconds wins.
    max_infer_seconds: float = 0.0
    shutdown_grace_s: float = 30.0
    dead_letter_max_length: int = 10000
    metrics_port: int = 0  # 0: no dispatcher /metrics; else `server N` listens on MetricsPort + N
    metrics_addr: str = "0.0.0.0"
    heartbeat_interval_s: float = 5.0  # the heartbeat key lives 3 intervals
    # More worker deaths than this within the window stop the dispatcher (exit status 1), so a
    # crash-looping model fails loudly to systemd or Kubernetes instead of restarting forever.
    worker_restart_limit: int = 5
    worker_restart_window_s: float = 60.0
    # How often a dispatcher looks for a new version under each model's ModelBasePath and for a
    # `goinfer reload`; 0: only on SIGHUP. A new version is rolled out one worker at a time.
    model_poll_s: float = 2.0
    # An asynchronous job waits and runs at most this long (it is not bound by MessageTimeout);
    # its answer is kept JobResultTTLS after it is done, failed or expired.
    job_timeout: float = 3600.0
    job_result_ttl_s: float = 86400.0
    # Where workers run: () leaves the environment as it is; ("cpu",) hides every GPU; ("0", "1")
    # spreads workers over those GPUs, each worker seeing only its own (CUDA_VISIBLE_DEVICES).
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    """Everything goinfer reads from one settings file and the GOINFER_ environment variables."""

    path: str = DEFAULT_SETTINGS_PATH
    api: ApiSettings = field(default_factory=ApiSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    err_code: Mapping[str, ErrorCode] = field(default_factory=lambda: dict(DEFAULT_ERROR_CODES))
    customer: Mapping[str, Any] = field(default_factory=dict)
    # What each process is told to serve: "package.module:Class", or "package.module:Class@/api/path"
    # for a class served under a path the settings give it (one class, several model files).
    models: tuple[str, ...] = ()
    # The per-model settings of the `Models:` entries written as mappings, by their `target`.
    model_configs: tuple[ModelConfig, ...] = ()
    # Unknown keys and GOINFER_ variables: ignored, as go-infer ignores unknown keys, but kept so
    # that the tiers log them and `goinfer check` fails on them (a typo silently loses a setting).
    warnings: tuple[str, ...] = ()
    # The GOINFER_ variables that overrode the file (names only: their values may be secrets).
    environment: tuple[str, ...] = ()

    def error(self, name: str) -> ErrorCode:
        """The code and message configured for one of the `ErrCode` names."""
        return self.err_code[name]

    def priority_of(self, kind: str, app_id: str = "", config: ModelConfig | None = None) -> str:
        """The lane of a request: its appId's API.AppIdPriority, else its model's Priority, else
        `kind`'s own (PRIORITY_HIGH for live requests, NORMAL for jobs, LOW for batch rows)."""
        chosen = self.api.app_id_priority.get(app_id)
        if chosen is None and isinstance(config, ModelConfig):
            chosen = config.priority
        return chosen or kind

    def model_config(self, target: str) -> ModelConfig | None:
        """The settings of the model served as `target` (see `models`); None for a plain entry."""
        return next((config for config in self.model_configs if config.target == target), None)


@dataclass(frozen=True)
class CacheSettings:
    """A model's result cache (`Cache:` of its `Models:` entry); both levels off by default."""

    size: int = 0  # answers kept in each HTTP process (LRU); 0: no in-process level
    ttl_s: float = 0.0  # how long an answer is kept in Redis for every tier; 0: no shared level

    @property
    def enabled(self) -> bool:
        return self.size > 0 or self.ttl_s > 0


@dataclass(frozen=True)
class ModelConfig:
    """One `Models:` entry written as a mapping: a class and how it is served.

    Only `Class` is required. `options` holds the entry's other keys, for the class to read
    (`self.config.options`): a model served from files without code is configured there.
    """

    cls: str  # "package.module:Class"
    api_path: str | None = None  # serve the class under this path instead of its own api_path
    base_path: str | None = None  # TF Serving's layout: <base>/<version number>/
    version: int | None = None  # pinned; None serves the highest number under base_path
    warmup: tuple[dict[str, Any], ...] = ()  # params each worker runs through the model before serving
    cache: CacheSettings = field(default_factory=CacheSettings)
    priority: str | None = None  # the lane of all its requests (PRIORITIES); None: by their kind
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """How processes name this model to each other (Settings.models)."""
        return f"{self.cls}@{self.api_path}" if self.api_path else self.cls


# --- value checks -------------------------------------------------------------------------------

Check = Callable[[Any], Any]


_NO_VALUE = object()


class _Bad(ValueError):
    """A value of the wrong type or range; its text completes "<file>: <key>: ...".

    The offending value is kept apart from the problem, so that a secret's message can say what
    kind of value was wrong without printing it.
    """

    def __init__(self, problem: str, value: Any = _NO_VALUE) -> None:
        super().__init__(problem)
        self.problem = problem
        self.value = value

    def text(self, secret: bool) -> str:
        if self.value is _NO_VALUE:
            return self.problem
        if secret:
            return f"{self.problem} {_kind(self.value)} (value not shown: a secret)"
        return f"{self.problem} {_shown(self.value)}"


def _int(minimum: int | None = None, maximum: int | None = None) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad("expected an integer, got", value)
        if minimum is not None and value < minimum:
            raise _Bad(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise _Bad(f"must be at most {maximum}, got {value}")
        return value

    return check


def _number(positive: bool = False) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad("expected a number, got", value)
        if not math.isfinite(value) or (positive and value <= 0) or value < 0:
            raise _Bad(f"must be a {'positive' if positive else 'non-negative'} number, got {value}")
        return float(value)

    return check


def _string(value: Any) -> str:
    # yaml.v3 decodes a bare scalar such as `RedisPasswd: 12345` into a Go string; do the same.
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise _Bad("expected a string, got", value)
    return value if isinstance(value, str) else str(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("expected true or false, got", value)
    return value


def _string_map(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad("expected a mapping of appId to secret, got", value)
    return {_string(k): _string(v) for k, v in value.items()}


def _string_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Bad("expected a list of strings, got", value)
    return tuple(_string(item) for item in value)


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _devices(value: Any) -> tuple[str, ...]:
    """`Devices: cpu`, `Devices: [0, 1]`, `Devices: 0` or `Devices: "0,1"`: device names as text."""
    if value is None or value == []:
        return ()
    items = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else [value]
    devices: list[str] = []
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if isinstance(text, str) and text.lower() == "cpu":
            devices.append("cpu")
        elif isinstance(text, int) and not isinstance(text, bool) and text >= 0:
            devices.append(str(text))
        elif isinstance(text, str) and text.isdigit():
            devices.append(str(int(text)))
        else:
            raise _Bad("expected \"cpu\" or a list of GPU numbers such as [0, 1], got", value)
    if "cpu" in devices and len(devices) > 1:
        raise _Bad("\"cpu\" cannot be listed with GPUs: got", value)
    return tuple(devices)


_MODEL_KEYS = ("Class", "ApiPath", "ModelBasePath", "ModelVersion", "Warmup", "Cache", "Priority")


def _priority(value: Any) -> str:
    text = _string(value).lower()
    if text not in PRIORITIES:
        raise _Bad(f"expected one of {', '.join(PRIORITIES)}, got", value)
    return text


def _priority_map(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad("expected a mapping of appId to high, normal or low, got", value)
    return {_string(k): _priority(v) for k, v in value.items()}
_CACHE_KEYS: dict[str, tuple[str, Check]] = {"Size": ("size", _int(0)), "TTLS": ("ttl_s", _number())}


def _model_entries(value: Any) -> tuple[tuple[str, ...], tuple[ModelConfig, ...]]:
    """`Models:`: import paths, or mappings with a `Class:` and how it is served."""
    if value is None:
        return (), ()
    if not isinstance(value, list):
        raise _Bad("expected a list of 'package.module:ClassName' or of mappings with a Class, got", value)
    targets: list[str] = []
    configs: list[ModelConfig] = []
    for item in value:
        if isinstance(item, dict):
            config = _model_config(item)
            configs.append(config)
            target = config.target
        else:
            target = _import_path(_string(item))
        if target in targets:
            raise _Bad(f"{target!r} is listed twice")
        targets.append(target)
    return tuple(targets), tuple(configs)


def _import_path(path: str) -> str:
    if not _IMPORT_PATH.match(path):
        raise _Bad(f"expected 'package.module:ClassName', got {path!r}")
    return path


def _model_config(raw: dict) -> ModelConfig:
    raw = {str(k): v for k, v in raw.items()}
    if raw.get("Class") is None:
        raise _Bad(f"a mapping entry needs Class: 'package.module:ClassName'; got the keys {sorted(raw)}")
    cls = _import_path(_string(raw["Class"]))
    where = f"{cls}: "
    api_path = raw.get("ApiPath")
    if api_path is not None:
        api_path = _string(api_path)
        if not api_path.startswith("/"):
            raise _Bad(f"{where}ApiPath must start with '/', got {api_path!r}")
    base = raw.get("ModelBasePath")
    version = raw.get("ModelVersion")
    if version is not None:
        version = _nested(where, "ModelVersion", _int(0), version)
        if base is None:
            raise _Bad(f"{where}ModelVersion pins a version of ModelBasePath, which is not set")
    warmup = raw.get("Warmup") or []
    if not isinstance(warmup, list) or not all(isinstance(params, dict) for params in warmup):
        raise _Bad(f"{where}Warmup must be a list of params mappings, got", warmup)
    cache_raw = raw.get("Cache") or {}
    if not isinstance(cache_raw, dict):
        raise _Bad(f"{where}Cache must be a mapping with Size and TTLS, got", cache_raw)
    unknown = sorted(set(map(str, cache_raw)) - set(_CACHE_KEYS))
    if unknown:
        raise _Bad(f"{where}Cache has no key {unknown[0]!r} (it takes Size and TTLS)")
    cache = CacheSettings(**{attr: _nested(where, f"Cache.{key}", check, cache_raw[key])
                             for key, (attr, check) in _CACHE_KEYS.items() if cache_raw.get(key) is not None})
    return ModelConfig(
        cls=cls,
        api_path=api_path,
        base_path=None if base is None else _string(base),
        version=version,
        warmup=tuple(dict(params) for params in warmup),
        cache=cache,
        priority=None if raw.get("Priority") is None else _nested(where, "Priority", _priority, raw["Priority"]),
        options={key: value for key, value in raw.items() if key not in _MODEL_KEYS},
    )


def _nested(where: str, key: str, check: Check, value: Any) -> Any:
    try:
        return check(value)
    except _Bad as exc:
        raise _Bad(f"{where}{key} {exc.text(False)}") from None


def _kind(value: Any) -> str:
    return {bool: "a boolean", type(None): "nothing", dict: "a mapping", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _shown(value: Any) -> str:
    kind = _kind(value)
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
    "InlineCheckBytes": ("inline_check_bytes", _int(0)),
    "CheckProcesses": ("check_processes", _int(0, 64)),
    "MaxUnverified": ("max_unverified", _int(1)),
    "MaxUnverifiedPerClient": ("max_unverified_per_client", _int(1)),
    "ApiEntryThreads": ("api_entry_threads", _int(0, 1024)),
    "MaxWaitingApiEntries": ("max_waiting_api_entries", _int(0)),
    "HttpWorkers": ("http_workers", _int(1, 256)),
    "BodyReadTimeoutS": ("body_read_timeout_s", _number(positive=True)),
    "RejectReplay": ("reject_replay", _bool),
    "ShutdownDrainS": ("shutdown_drain_s", _number()),
    "AccessLog": ("access_log", _bool),
    "BusyPollUs": ("busy_poll_us", _int(0, 1_000_000)),
    "AppIdPriority": ("app_id_priority", _priority_map),
}

_SERVER_KEYS: dict[str, tuple[str, Check]] = {
    "RedisServer": ("redis_server", _string),
    "RedisPasswd": ("redis_passwd", _string),
    "RedisTimeoutS": ("redis_timeout_s", _number(positive=True)),
    "RedisSentinelPasswd": ("redis_sentinel_passwd", _string),
    "RedisCluster": ("redis_cluster", _bool),
    "EnqueueReplicas": ("enqueue_replicas", _int(0, 16)),
    "EnqueueReplicasTimeoutMs": ("enqueue_replicas_timeout_ms", _int(1, 60_000)),
    "QueueName": ("queue_name", _string),
    "RequestQueueAmount": ("request_queue_amount", _int(1, 1024)),
    "MessageTimeout": ("message_timeout", _number(positive=True)),
    "MaxWorkers": ("max_workers", _int(1, 1024)),
    "BatchSize": ("batch_size", _int(1, 4096)),
    "BatchTimeoutMs": ("batch_timeout_ms", _number()),
    "TakeAheadMs": ("take_ahead_ms", _number()),
    "MaxQueueLength": ("max_queue_length", _int(1)),
    "ClaimIdleMs": ("claim_idle_ms", _int(500)),
    "MaxDeliveries": ("max_deliveries", _int(1, 100)),
    "MaxInferSeconds": ("max_infer_seconds", _number()),
    "ShutdownGraceS": ("shutdown_grace_s", _number()),
    "DeadLetterMaxLength": ("dead_letter_max_length", _int(1)),
    "MetricsPort": ("metrics_port", _int(0, 65535)),
    "MetricsAddr": ("metrics_addr", _string),
    "HeartbeatIntervalS": ("heartbeat_interval_s", _number(positive=True)),
    "WorkerRestartLimit": ("worker_restart_limit", _int(0)),
    "WorkerRestartWindowS": ("worker_restart_window_s", _number(positive=True)),
    "ModelPollS": ("model_poll_s", _number()),
    "JobTimeout": ("job_timeout", _number(positive=True)),
    "JobResultTTLS": ("job_result_ttl_s", _number(positive=True)),
    "Devices": ("devices", _devices),
}

_SECTIONS = ("API", "Server", "ErrCode", "Customer", "Models")
_SCHEMAS: dict[str, dict[str, tuple[str, Check]]] = {"API": _API_KEYS, "Server": _SERVER_KEYS}
_ENV_SECTIONS = ("API", "Server", "ErrCode", "Customer")  # Models is GOINFER_MODELS

# Keys whose values no message shows: the credentials, and RedisServer, whose URL may hold one.
SECRET_KEYS = frozenset({"API.SM2PrivateKey", "API.AppIdSecret", "Server.RedisPasswd", "Server.RedisServer",
                         "Server.RedisSentinelPasswd"})


def load_settings(path: str = DEFAULT_SETTINGS_PATH, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and check a settings file, overridden by the GOINFER_ variables of `environ`.

    `environ` defaults to os.environ. Raises SettingsError with a one-line reason if unusable.
    """
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise SettingsError(path, None, "file not found") from None
    except OSError as exc:
        raise SettingsError(path, None, f"cannot read: {exc.strerror or exc}") from None
    return parse_settings(text, path, os.environ if environ is None else environ)


def parse_settings(text: bytes | str, path: str = "<settings>", environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from YAML text and the GOINFER_ variables of `environ` (none by default).

    `path` is only used in messages.
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(path, None, f"not valid YAML{_yaml_problem(exc)}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise SettingsError(path, None, f"expected a mapping of sections, got {_kind(document)}")
    warnings = _Warnings()
    warnings.unknown_keys(path, "", document, _SECTIONS)
    applied = _apply_environment(document, environ or {}, warnings)

    api = _section(path, document, "API", ApiSettings, warnings)
    server = _section(path, document, "Server", ServerSettings, warnings)
    if not server.queue_name:
        raise SettingsError(path, "Server.QueueName", "must not be empty")
    _check_redis_address(path, server)
    models, model_configs = _value(path, "Models", _model_entries, document.get("Models"))
    return Settings(
        path=path,
        api=api,
        server=server,
        err_code=_error_codes(path, document.get("ErrCode")),
        customer=_customer(path, document.get("Customer")),
        models=models,
        model_configs=model_configs,
        warnings=tuple(warnings),
        environment=tuple(applied),
    )


def _check_redis_address(path: str, server: ServerSettings) -> None:
    """Parse RedisServer now, so that a malformed address is one line at start, not a traceback
    in the first process that connects. (Imported here: goinfer.redis_address builds on this module.)"""
    from goinfer.redis_address import redis_address

    try:
        redis_address(server)
    except ValueError as exc:  # the messages show no password
        raise SettingsError(path, "Server.RedisServer", str(exc)) from None


class _Warnings(list):
    """Unknown keys and variables: logged where found (as go-infer ignores them) and kept."""

    def add(self, message: str) -> None:
        log.warning("%s", message)
        self.append(message)

    def unknown_keys(self, path: str, prefix: str, raw: dict, known: Iterable[str]) -> None:
        names = list(known)
        for key in raw:
            if key not in names:
                self.add(f"{path}: {prefix}{key}: unknown key, ignored{_suggestion(str(key), names, prefix)}")


def _suggestion(name: str, known: list[str], prefix: str = "") -> str:
    """The key the operator probably meant; go-infer's names are case-sensitive, so say so."""
    same = [k for k in known if k.lower() == name.lower()]
    if same:
        return f"; did you mean {prefix}{same[0]}? (names are case-sensitive)"
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: {problem}"


# --- the environment ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _FromEnv:
    """A value given by a GOINFER_ variable: raw text, typed once the key's type is known."""

    text: str
    variable: str
    replaces: Any = None  # the file's value, for the untyped Customer section

    @property
    def where(self) -> str:
        return f"environment variable {self.variable}"


def _apply_environment(document: dict, environ: Mapping[str, str], warnings: _Warnings) -> list[str]:
    """Put each GOINFER_<SECTION>__<KEY> variable into the document in place of the file's value.

    Sections and keys match go-infer's names whatever their case, since variables are usually
    upper case. Variables without the double underscore (GOINFER_LOG_LEVEL, ...) are not settings.
    """
    applied = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        if upper == ENV_MODELS:
            document["Models"] = _FromEnv(environ[name], name)
            applied.append(name)
            continue
        section_part, separator, key_part = name[len(ENV_PREFIX):].partition(ENV_SEPARATOR)
        if not separator:
            continue
        section = _match(section_part, _ENV_SECTIONS)
        if section is None:
            hint = _env_suggestion(section_part.upper(), [s.upper() for s in _ENV_SECTIONS], ENV_PREFIX,
                                   ENV_SEPARATOR + key_part)
            warnings.add(f"environment variable {name}: unknown section {section_part!r}, ignored{hint}")
            continue
        raw = document.get(section)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            continue  # the file's section is refused with its own message
        if section in _SCHEMAS:
            known = list(_SCHEMAS[section])
        elif section == "ErrCode":
            known = list(dict.fromkeys([*DEFAULT_ERROR_CODES, *map(str, raw)]))
        else:
            known = [str(k) for k in raw]
        key = _match(key_part, known)
        if key is None and section == "Customer":
            key = key_part  # free keys: as spelled in the variable
        if key is None:
            hint = _env_suggestion(key_part.upper(), [k.upper() for k in known],
                                   f"{ENV_PREFIX}{section.upper()}{ENV_SEPARATOR}")
            warnings.add(f"environment variable {name}: {section} has no key {key_part!r}, ignored{hint}")
            continue
        document[section] = {**raw, key: _FromEnv(environ[name], name, raw.get(key))}
        applied.append(name)
    return applied


def _match(name: str, known: Iterable[str]) -> str | None:
    folded = name.lower()
    return next((k for k in known if k.lower() == folded), None)


def _env_suggestion(name: str, known: list[str], prefix: str, suffix: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {prefix}{close[0]}{suffix}?" if close else ""


# Models' entries are typed as YAML types them: their mappings hold numbers (ModelVersion, Cache).
_TEXT_COLLECTIONS = (_string_map, _string_list)


def _typed(env: _FromEnv, key: str, check: Check) -> Any:
    """The variable's text as the key's type.

    Strings are kept exactly as written: YAML would turn a password 0123 into 83 and yes into
    True. Lists may be comma-separated; lists and mappings of strings are read with YAML's base
    loader, which keeps every scalar a string. Numbers and booleans are read as YAML.
    """
    if check is _string:
        return env.text
    if check in (_string_list, _model_entries) and not env.text.lstrip().startswith(("[", "-")):
        return [item.strip() for item in env.text.split(",") if item.strip()]
    loader = yaml.BaseLoader if check in _TEXT_COLLECTIONS else yaml.SafeLoader
    return _yaml_value(env, key, loader)


def _yaml_value(env: _FromEnv, key: str, loader: type) -> Any:
    try:
        return yaml.load(env.text, Loader=loader)  # BaseLoader or SafeLoader: no object construction
    except yaml.YAMLError as exc:
        detail = "" if key in SECRET_KEYS else _yaml_problem(exc)
        raise SettingsError(env.where, key, f"not valid YAML{detail}") from None


# --- the sections -------------------------------------------------------------------------------


def _section(path: str, document: dict, name: str, cls: type, warnings: _Warnings) -> Any:
    keys = _SCHEMAS[name]
    raw = document.get(name)
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SettingsError(path, name, f"expected a mapping, got {_kind(raw)}")
    warnings.unknown_keys(path, f"{name}.", raw, keys)
    values = {
        attr: _value(path, f"{name}.{key}", check, raw[key])
        for key, (attr, check) in keys.items()
        if key in raw and raw[key] is not None
    }
    return cls(**values)


def _value(path: str, key: str, check: Check, raw: Any) -> Any:
    """One checked value; the message names where it came from and hides secrets."""
    where = path
    if isinstance(raw, _FromEnv):
        where = raw.where
        raw = _typed(raw, key, check)
    try:
        return check(raw)
    except _Bad as exc:
        raise SettingsError(where, key, exc.text(key in SECRET_KEYS)) from None


def _error_codes(path: str, raw: Any) -> dict[str, ErrorCode]:
    codes = dict(DEFAULT_ERROR_CODES)
    if raw is None:
        return codes
    if not isinstance(raw, dict):
        raise SettingsError(path, "ErrCode", f"expected a mapping, got {_kind(raw)}")
    for name, entry in raw.items():
        key = f"ErrCode.{name}"
        where = path
        if isinstance(entry, _FromEnv):
            where = entry.where
            entry = _yaml_value(entry, key, yaml.SafeLoader)
        if not isinstance(entry, dict):
            raise SettingsError(where, key, f"expected {{code: <int>, msg: <text>}}, got {_shown(entry)}")
        default = codes.get(str(name))
        if "code" not in entry and default is None:
            raise SettingsError(where, f"{key}.code", "missing")
        code = _value(where, f"{key}.code", _int(), entry.get("code", default.code if default else 0))
        msg = _value(where, f"{key}.msg", _string, entry.get("msg", default.msg if default else ""))
        codes[str(name)] = ErrorCode(code, msg)
    return codes


def _customer(path: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SettingsError(path, "Customer", f"expected a mapping, got {_kind(raw)}")
    return {str(k): _customer_value(v) for k, v in raw.items()}


def _customer_value(value: Any) -> Any:
    """Customer values have no schema: a variable replacing a string stays text, others are YAML."""
    if not isinstance(value, _FromEnv):
        return value
    if isinstance(value.replaces, str):
        return value.text
    try:
        return yaml.safe_load(value.text)
    except yaml.YAMLError:
        return value.text
