"""What `goinfer call`, `goinfer keygen`, `goinfer check` and `goinfer status` do, as plain functions.

An operator's first questions after writing a settings file are "is it right?" and "does a signed
request get through?"; these answer them with the same code the tiers use (settings loader, model
registry, SM2 key derivation, the client's signing), so a tool that says "ok" means the service
will agree. Nothing here returns or formats a secret, except `new_keypair`, whose job is to make
one.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from goinfer.client import JOBS_PREFIX, Client, GoinferError, JobHandle, JobNotDone, SignType
from goinfer.published import published_verdict
from goinfer.settings import Settings, load_settings

REDIS_CHECK_TIMEOUT_S = 3.0
# At maxmemory Redis must refuse writes rather than delete keys: all of goinfer's keys are live.
NEEDED_MAXMEMORY_POLICY = "noeviction"
# The HTTP tier answers within MessageTimeout (QueueTimeout at worst); wait a little longer.
CALL_TIMEOUT_MARGIN_S = 5.0

__all__ = [
    "CheckResult",
    "KeyPair",
    "ToolError",
    "call",
    "check_clients",
    "check_models",
    "check_published",
    "check_redis",
    "check_redis_cluster",
    "check_settings",
    "check_sm2_key",
    "client_for",
    "default_url",
    "job_result",
    "new_keypair",
    "parse_data",
    "run_checks",
    "submit_job",
]


class ToolError(Exception):
    """A failure shown to the operator as one line; `status` is the exit status to use."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# --- call ---------------------------------------------------------------------------------------


def parse_data(text: str) -> dict[str, Any]:
    """The request's `data`: a JSON object, as go-infer's API document requires."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object ({{...}}), got {type(value).__name__}")
    return value


def default_url(settings: Settings) -> str:
    """Where this machine reaches the HTTP tier: API.Addr when it names one address, else loopback."""
    addr = settings.api.addr.strip()
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        host = addr or "127.0.0.1"  # a host name
    else:
        if ip.is_unspecified:
            host = "127.0.0.1"
        else:
            host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{host}:{settings.api.port}"


def client_for(settings: Settings, *, url: str | None = None, sign_type: SignType = "SM2",
               app_id: str | None = None, timeout: float | None = None) -> Client:
    """A Client with the settings' credentials: the first AppIdSecret entry unless `app_id`.

    For "plain" the first AllowSignPlain appId is the default, since only those may send it.
    """
    secrets_by_id = settings.api.app_id_secret
    if app_id is None:
        candidates = list(settings.api.allow_sign_plain) if sign_type == "plain" else []
        candidates += list(secrets_by_id)
        if not candidates:
            raise ToolError(f"{settings.path}: API.AppIdSecret has no entries: no appId to sign with", 2)
        app_id = candidates[0]
    if sign_type != "plain" and app_id not in secrets_by_id:
        raise ToolError(f"{settings.path}: appId {app_id} is not in API.AppIdSecret", 2)
    if sign_type == "SM2" and not settings.api.sm2_private_key:
        raise ToolError(f"{settings.path}: API.SM2PrivateKey is not set: use --sign SHA256", 2)
    return Client(
        url or default_url(settings),
        app_id,
        secrets_by_id.get(app_id, ""),
        sign_type=sign_type,
        sm2_private_key=settings.api.sm2_private_key or None,
        timeout=timeout if timeout is not None else settings.server.message_timeout + CALL_TIMEOUT_MARGIN_S,
    )


def call(client: Client, api_path: str, data: dict[str, Any]) -> dict[str, Any]:
    """The answer's `data`; GoinferError for an error envelope, ToolError when none came back."""
    with _reaching(client, client.url + api_path):
        return client.call(api_path, data)


def submit_job(client: Client, api_path: str, data: dict[str, Any]) -> JobHandle:
    """`call` as an asynchronous job: its handle, at once (the same errors as `call`)."""
    with _reaching(client, client.url + JOBS_PREFIX + api_path):
        return client.submit(api_path, data)


def job_result(handle: JobHandle, timeout: float | None = None) -> dict[str, Any]:
    """The job's answer data, polled for until it has one: GoinferError when it failed or
    expired, ToolError when no tier answers or `timeout` passes."""
    where = f"{handle.client.url}{JOBS_PREFIX}/{handle.job_id}"
    with _reaching(handle.client, where):
        try:
            return handle.result(timeout)
        except JobNotDone as exc:
            raise ToolError(f"{exc}; it goes on: poll it again later by its id") from None


@contextmanager
def _reaching(client: Client, where: str) -> Iterator[None]:
    """What reaching the HTTP tier can fail with, as one ToolError line each."""
    try:
        yield
    except GoinferError:
        raise
    except json.JSONDecodeError:
        raise ToolError(f"{where} answered with something other than goinfer's JSON envelope "
                        "(is it a goinfer HTTP tier?)") from None
    except urllib.error.URLError as exc:  # refused, unknown host, unreachable, connect timeout
        reason = exc.reason
        text = getattr(reason, "strerror", None) or str(reason)
        raise ToolError(f"cannot reach {client.url}: {text}") from None
    except TimeoutError:
        raise ToolError(f"no answer from {where} within {client.timeout:g}s") from None
    except (http.client.HTTPException, ConnectionError) as exc:
        raise ToolError(f"connection to {client.url} failed: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # e.g. a --url that is not http(s)
        raise ToolError(f"cannot call {where}: {exc}", 2) from None


# --- keygen -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """A new SM2 key pair in the forms go-infer's settings and clients use."""

    private_b64: str = ""  # API.SM2PrivateKey: base64 of the 32-byte big-endian scalar
    public_hex: str = ""  # x||y, 128 hex characters (gmssl's CryptSM2 public_key)

    @property
    def public_hex_04(self) -> str:
        """The uncompressed point encoding 04||x||y, for tools that want it."""
        return "04" + self.public_hex


def new_keypair() -> KeyPair:
    """A fresh key from the operating system's random source."""
    from goinfer.crypto.sm2 import generate_keypair

    private_b64, public_hex = generate_keypair()
    return KeyPair(private_b64, public_hex)


# --- check --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One line of `goinfer check`: what was checked, whether it passed, and why or what.

    `exit_status` is what a failure makes `goinfer check` exit with: 2 for settings the tiers
    refuse to start with, 1 for the rest. A `warning` passes but deserves the operator's eye.
    """

    name: str
    ok: bool
    detail: str = ""
    warning: bool = False
    exit_status: int = 1

    def line(self) -> str:
        if not self.ok:
            return f"{self.name}: FAIL: {self.detail}"
        if self.warning:
            return f"{self.name}: WARNING: {self.detail}"
        return f"{self.name}: ok" + (f" ({self.detail})" if self.detail else "")


def check_settings(settings: Settings) -> list[CheckResult]:
    """The file loads; each unknown key or GOINFER_ variable fails (the tiers only warn)."""
    if settings.warnings:
        return [CheckResult("settings", False, warning) for warning in settings.warnings]
    server = settings.server
    detail = (f"{settings.path}: API on {settings.api.addr}:{settings.api.port}, "
              f"queues {server.queue_name}0..{server.request_queue_amount - 1}")
    if settings.environment:
        detail += f"; from the environment: {', '.join(settings.environment)}"
    return [CheckResult("settings", True, detail)]


def check_published(settings: Settings) -> CheckResult:
    """go-infer's published example credentials: refused off loopback, a warning on it."""
    verdict = published_verdict(settings)
    if verdict.refused:
        return CheckResult("secrets", False, verdict.message, exit_status=2)
    if verdict.warns:
        return CheckResult("secrets", True, verdict.message, warning=True)
    return CheckResult("secrets", True, "no published example values")


def check_models(settings: Settings) -> CheckResult:
    """The models the `goinfer` command would serve import and define every hook."""
    from goinfer.models.registry import ModelError, resolve_models
    from goinfer.models.versions import VersionError, choose_version

    try:
        registry = resolve_models(settings.models)
    except ModelError as exc:
        return CheckResult("models", False, f"{settings.path}: Models: {exc}")
    routes = ", ".join(cls.api_path for cls in registry.classes)
    # Version folders matter where dispatchers run, which may be other machines: a warning here.
    versions, missing = [], []
    for config in settings.model_configs:
        if config.base_path:
            try:
                versions.append(f"{config.target} version {choose_version(config.base_path, config.version).number}")
            except VersionError as exc:
                missing.append(f"{config.target}: {exc}")
    if missing:
        return CheckResult("models", True, f"{len(registry)}: {routes}; no version to serve on this machine: "
                                           f"{'; '.join(missing)} (a dispatcher here would stop)", warning=True)
    served = f"; {', '.join(versions)}" if versions else ""
    return CheckResult("models", True, f"{len(registry)}: {routes}{served}")


def check_sm2_key(settings: Settings) -> CheckResult:
    """API.SM2PrivateKey yields a public key (the HTTP tier refuses to start otherwise)."""
    from goinfer.crypto.sm2 import public_key_from_private_b64, public_key_to_hex

    if not settings.api.sm2_private_key:
        return CheckResult("SM2 key", True, "not set: requests signed with SM2 will be refused")
    try:
        public = public_key_from_private_b64(settings.api.sm2_private_key)
    except ValueError as exc:  # the messages never contain the key
        return CheckResult("SM2 key", False, f"{settings.path}: API.SM2PrivateKey: {exc}")
    return CheckResult("SM2 key", True, f"public key {public_key_to_hex(public, prefix=True)}")


def check_clients(settings: Settings) -> CheckResult:
    """At least one appId can call: without any, every request is refused with SignFail5."""
    api = settings.api
    if not api.app_id_secret and not api.allow_sign_plain:
        return CheckResult("clients", False, f"{settings.path}: API.AppIdSecret has no entries: "
                                              "every request would be refused")
    return CheckResult("clients", True, f"{len(api.app_id_secret)} appIds, "
                                        f"{len(api.allow_sign_plain)} allowed to sign plain")


def check_redis(settings: Settings, timeout: float = REDIS_CHECK_TIMEOUT_S) -> CheckResult:
    """Redis answers PING with the settings' address and password, within `timeout` seconds, and
    never evicts keys (`maxmemory-policy noeviction`).

    Every eviction policy lets Redis delete keys when it reaches maxmemory, and goinfer's keys
    are all live data: a queued request (the whole stream, with its consumer group), a reply
    list an HTTP process waits on. Deleted, they are lost without a word: requests answered
    QueueTimeout that never ran or ran for nobody. With noeviction, Redis refuses writes
    instead: the HTTP tier answers SendMsgFail at once and workers keep their replies until
    memory is freed.
    """
    from redis.exceptions import RedisError

    from goinfer.connections import refusal, sync_client
    from goinfer.redis_address import describe_redis, redis_address

    try:
        if redis_address(settings.server).kind == "cluster":
            return check_redis_cluster(settings)
        address = describe_redis(settings.server)
        # The tiers' client (password, TLS, the master a Sentinel names), with a short timeout.
        client = sync_client(settings.server, timeout_s=timeout)
    except ValueError as exc:
        return CheckResult("redis", False, f"{settings.path}: Server.RedisServer: {exc}")
    try:
        client.ping()
        version = client.info("server").get("redis_version", "?")
        memory = client.info("memory")  # not CONFIG GET: managed services often forbid CONFIG
    except RedisError as exc:
        refused = refusal(exc, settings.server)  # wrong or missing password, ACL: named, never shown
        if refused is not None:
            return CheckResult("redis", False, str(refused))
        return CheckResult("redis", False, f"{address} does not answer: {exc}")
    finally:
        client.close()
    limit = int(memory.get("maxmemory", 0) or 0)
    if "maxmemory_policy" not in memory:
        return CheckResult("redis", True, f"{address}, redis {version}: it does not say its maxmemory-policy; "
                                          f"goinfer needs {NEEDED_MAXMEMORY_POLICY}", warning=True)
    policy = str(memory["maxmemory_policy"])
    detail = f"{address}, redis {version}, maxmemory {limit or 'unlimited'}, maxmemory-policy {policy}"
    if policy != NEEDED_MAXMEMORY_POLICY:
        return CheckResult("redis", False, f"{detail}: any policy but {NEEDED_MAXMEMORY_POLICY} lets Redis "
                                           "delete queued requests, reply lists and consumer groups when it "
                                           f"fills up; set maxmemory-policy {NEEDED_MAXMEMORY_POLICY}")
    return CheckResult("redis", True, detail)


def check_redis_cluster(settings: Settings) -> CheckResult:
    """check_redis for a Redis Cluster: it answers as one, every node (replicas too: one may
    become a primary) never evicts, and which primary serves each queue number's slot."""
    from redis.exceptions import RedisClusterException, RedisError

    from goinfer.cluster_clients import as_redis_error
    from goinfer.connections import cluster_map, refusal
    from goinfer.queue import queue_tag
    from goinfer.redis_address import describe_redis

    server = settings.server
    address = describe_redis(server)
    try:
        cluster = cluster_map(server)
    except (RedisClusterException, RedisError, OSError) as exc:
        error = as_redis_error(exc, server)
        refused = refusal(error, server)  # a wrong password, or no cluster: named, never shown
        return CheckResult("redis", False, str(refused) if refused else f"{address} does not answer: {error}")
    try:
        nodes = {node.name: node.redis_connection for node in cluster.get_nodes()}
        primaries = sorted(node.name for node in cluster.get_primaries())
        placement = [f"{queue_tag(index)} on {cluster.get_node_from_key(queue_tag(index)).name}"
                     for index in range(server.request_queue_amount)]
        infos = {name: (client.info("server"), client.info("memory")) for name, client in nodes.items() if client}
    except (RedisClusterException, RedisError, OSError) as exc:
        return CheckResult("redis", False, f"{address} does not answer: {as_redis_error(exc, server)}")
    finally:
        cluster.close()
    versions = sorted({str(info.get("redis_version", "?")) for info, _ in infos.values()})
    policies = {name: str(memory.get("maxmemory_policy", "?")) for name, (_, memory) in infos.items()}
    detail = (f"{address}: {len(primaries)} primaries ({', '.join(primaries)}) and {len(nodes) - len(primaries)} "
              f"replicas, redis {', '.join(versions)}; queues: {', '.join(placement)}")
    evicting = sorted(name for name, policy in policies.items() if policy != NEEDED_MAXMEMORY_POLICY)
    if evicting:
        return CheckResult("redis", False, f"{detail}: maxmemory-policy is not {NEEDED_MAXMEMORY_POLICY} on "
                                           f"{', '.join(f'{name} ({policies[name]})' for name in evicting)}, which "
                                           "lets Redis delete queued requests, reply lists and consumer groups "
                                           f"when it fills up; set maxmemory-policy {NEEDED_MAXMEMORY_POLICY}")
    return CheckResult("redis", True, f"{detail}, maxmemory-policy {NEEDED_MAXMEMORY_POLICY}")


def run_checks(path: str, redis_timeout: float = REDIS_CHECK_TIMEOUT_S) -> list[CheckResult]:
    """Every check on one settings file; SettingsError when the file itself is unusable."""
    settings = load_settings(path)
    results = check_settings(settings)
    results.append(check_published(settings))
    results.append(check_clients(settings))
    results.append(check_models(settings))
    results.append(check_sm2_key(settings))
    results.append(check_redis(settings, redis_timeout))
    return results



# --- status -------------------------------------------------------------------------------------

STATUS_TIMEOUT_S = 5.0


def fetch_status(url: str, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    """The HTTP tier's /goinfer/status document; ToolError when it cannot be had."""
    where = url.rstrip("/") + "/goinfer/status"
    try:
        with urllib.request.urlopen(where, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise ToolError(f"cannot reach {url}: {getattr(reason, 'strerror', None) or reason}") from None
    except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
        raise ToolError(f"no status from {where}: {type(exc).__name__}: {exc}") from None
    except ValueError:
        raise ToolError(f"{where} answered with something other than JSON (is it a goinfer HTTP tier?)") from None
    if not isinstance(body, dict):
        raise ToolError(f"{where} answered with something other than a status document")
    return body


def status_lines(body: dict[str, Any]) -> list[str]:
    """/goinfer/status for people: per dispatcher its state, workers, versions, devices, rollout
    and refused reload; then what a queue not served yet waits for."""
    lines = [f"goinfer {body.get('version', '?')}; redis {'answers' if body.get('redis') else 'does not answer'}"]
    for beat in body.get("dispatchers") or []:
        if not isinstance(beat, dict):
            continue
        lines.append(f"dispatcher {beat.get('host', '?')}:{beat.get('pid', '?')} queue {beat.get('queue_index', '?')}: "
                     f"{beat.get('summary') or beat.get('state', '?')}")
        for api, revision in sorted((beat.get("revisions") or {}).items()):
            lines.append(f"  {api}: revision {revision}")
    for line in body.get("waiting_for") or []:
        lines.append(f"waiting: {line}")
    for api, cache in sorted((body.get("result_cache") or {}).items()):
        if isinstance(cache, dict):
            lines.append(f"result cache {api}: revision {cache.get('revision') or 'unknown'}, "
                         f"{cache.get('memory_entries', 0)} answers in this process")
    return lines
