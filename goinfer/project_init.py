"""`goinfer init`: a new project with credentials of its own and a model to start from.

The shipped config/settings.yaml carries go-infer's published example credentials, which the
tiers refuse on any non-loopback address. A new service should never start from them, so this
writes a settings file with a fresh SM2 key pair, appId, appSecret and Redis password (from the
`secrets` module), and a working model skeleton beside it. Existing files are never overwritten.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from goinfer.tools import KeyPair, new_keypair

SETTINGS_NAME = "settings.yaml"
MODEL_MODULE = "mymodel"
MODEL_CLASS = "MyModel"
API_PATH = "/api/mymodel"
PORT = 5000
ADDR = "127.0.0.1"


class InitError(Exception):
    """A project that cannot be written; the message is the one line shown to the operator."""


@dataclass(frozen=True)
class Credentials:
    """What a client needs to call the new service (the Redis password stays server-side)."""

    app_id: str
    app_secret: str = field(repr=False)
    keypair: KeyPair = field(repr=False)
    redis_passwd: str = field(repr=False)


@dataclass(frozen=True)
class Project:
    """A written project: where its files are and the credentials in them."""

    folder: Path
    settings_path: Path
    model_path: Path
    credentials: Credentials = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{ADDR}:{PORT}{API_PATH}"


def new_credentials() -> Credentials:
    """Fresh secrets in go-infer's shapes: appId and appSecret as 32 upper-case hex characters."""
    return Credentials(
        app_id=secrets.token_hex(16).upper(),
        app_secret=secrets.token_hex(16).upper(),
        keypair=new_keypair(),
        redis_passwd=secrets.token_hex(16),
    )


def init_project(folder: str | os.PathLike[str]) -> Project:
    """Write settings.yaml and mymodel.py into `folder` (created if missing); never overwrite."""
    root = Path(folder)
    settings_path = root / SETTINGS_NAME
    model_path = root / f"{MODEL_MODULE}.py"
    if root.exists() and not root.is_dir():
        raise InitError(f"{root} exists and is not a folder")
    for path in (settings_path, model_path):
        if path.exists() or path.is_symlink():
            raise InitError(f"{path} already exists: goinfer init never overwrites a file; "
                            "choose another folder or move it away")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InitError(f"cannot create {root}: {exc.strerror or exc}") from None
    credentials = new_credentials()
    name = _project_name(root)
    written: list[Path] = []
    try:
        # The settings hold secrets: readable by their owner only.
        _create(settings_path, settings_text(credentials, name), 0o600)
        written.append(settings_path)
        _create(model_path, MODEL_TEMPLATE, 0o644)
        written.append(model_path)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError):
            raise InitError(f"{exc.filename} already exists: goinfer init never overwrites a file") from None
        raise InitError(f"cannot write {exc.filename or root}: {exc.strerror or exc}") from None
    return Project(root, settings_path, model_path, credentials)


def _create(path: Path, text: str, mode: int) -> None:
    """O_EXCL: a file that appeared since the check is still not overwritten."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)


def _project_name(root: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.resolve().name).strip("-.")
    return name or "goinfer"


def settings_text(credentials: Credentials, name: str) -> str:
    """The settings file: every key of go-infer's schema and goinfer's, commented."""
    return SETTINGS_TEMPLATE.substitute(
        name=name,
        sm2_private_key=credentials.keypair.private_b64,
        app_id=credentials.app_id,
        app_secret=credentials.app_secret,
        redis_passwd=credentials.redis_passwd,
        queue_name=f"{name}-queue",
        port=PORT,
        addr=ADDR,
        model=f"{MODEL_MODULE}:{MODEL_CLASS}",
    )


SETTINGS_TEMPLATE = Template("""\
# goinfer settings of $name, written by `goinfer init`. The schema is go-infer's settings.yaml;
# keys marked "goinfer:" are goinfer's additions, with their defaults.
#
# Start the service from this folder (models are imported from the working directory):
#     goinfer up --yaml settings.yaml
#
# This file holds the service's secrets (API.SM2PrivateKey, API.AppIdSecret, Server.RedisPasswd).
# Keep it private and out of version control, or leave them out here and set them in the
# environment, which wins over this file: GOINFER_<SECTION>__<KEY>, section and key in any case,
# e.g. GOINFER_SERVER__REDISPASSWD, GOINFER_API__SM2PRIVATEKEY, GOINFER_API__APPIDSECRET='{ID: secret}'.
# Text keys take the variable's text as it is; numbers, booleans, lists and mappings are YAML.

# HTTP tier
API:
    Port: $port
    # The address to listen on. 127.0.0.1: this machine only. To serve other machines, set the
    # host's address (or 0.0.0.0 for all of them; better behind nginx, see goinfer's deploy/).
    Addr: $addr
    # SM2 private key (base64 of the 32-byte scalar). Its public key verifies "SM2" signed
    # requests; clients that sign with SM2 sign with this key. `goinfer keygen` prints a new one.
    SM2PrivateKey: "$sm2_private_key"
    AppIdSecret: { # appId : appSecret of each client ("SHA256" requests are signed with the secret)
        "$app_id" : "$app_secret",
    }
    RequestTimestampDiff: 300 # seconds a request's timestamp may differ from the server's clock
    AllowSignPlain: [] # appIds allowed to send signType "plain" (no signature)
    # goinfer: larger bodies are refused with BodyTooLarge (9710) before being read; checking a
    # body's signature costs up to ~0.5 us per byte before its sender is known.
    MaxBodyBytes: 4194304
    MaxJsonDepth: 512 # goinfer: deeper JSON nesting is refused with SignFail1 (9801)
    # goinfer: bodies up to InlineCheckBytes that are cheap to check are checked on the event
    # loop; all others in CheckProcesses child processes, so that no body stalls other clients.
    InlineCheckBytes: 16384
    CheckProcesses: 1
    # goinfer: at most MaxUnverified such bodies are received or checked at once,
    # MaxUnverifiedPerClient per client address; more get TooManyUnverified (9713, HTTP 429).
    # Behind a proxy every client has the proxy's address: limit per client in the proxy.
    MaxUnverified: 16
    MaxUnverifiedPerClient: 4
    # goinfer: each model's api_entry runs in ApiEntryThreads threads of its own (0: on the event
    # loop); when MaxWaitingApiEntries more wait, the next gets ApiEntryBusy (9714).
    ApiEntryThreads: 4
    MaxWaitingApiEntries: 1000
    # goinfer: one INFO line per answered request on the logger "goinfer.access":
    # method, path, appId, code, latency, requestId. false: no line, no cost.
    AccessLog: true
    # goinfer: after each request and response, keep polling this many microseconds before the
    # event loop sleeps, while the machine has a core to spare (0: sleep at once). Lower latency
    # for fast models at low concurrency, for CPU; see README, Settings.
    BusyPollUs: 0
    # goinfer: the priority lane (high, normal, low) of every request of these appIds, instead of
    # live requests high, jobs normal, batch rows low; e.g. { 3EA25569454745D01219080B779F021F: low }
    AppIdPriority: {}
    HttpWorkers: 1 # goinfer: HTTP processes sharing the port (SO_REUSEPORT); `http --workers N` overrides
    BodyReadTimeoutS: 30 # goinfer: a body not received within this is refused with BodyTimeout (9712)
    # goinfer: refuse a signature already seen within the timestamp window with Replayed (9807).
    # Off by default, as go-infer: a client that resends the same signed body would be refused.
    RejectReplay: false
    # goinfer: on SIGTERM, answer with "Connection: close" this long before closing the port, so
    # keep-alive clients and proxies move on. Behind nginx: above its upstream keepalive_timeout.
    ShutdownDrainS: 1

# Queue between the tiers, and the dispatchers
Server:
    # host:port, or a redis:// / rediss:// URL. `goinfer up` starts a private redis-server with
    # RedisPasswd when nothing answers here; elsewhere, give redis-server `requirepass` this password.
    RedisServer: "127.0.0.1:7480"
    RedisPasswd: "$redis_passwd"
    # goinfer: seconds Redis may take to answer before the HTTP tier counts the connection dead.
    RedisTimeoutS: 3
    QueueName: "$queue_name"
    RequestQueueAmount: 1 # number of queues; run `goinfer server N` for each N in [0, amount)
    MessageTimeout: 10 # seconds a request may wait for its answer before QueueTimeout (9997)
    MaxWorkers: 8 # worker processes per dispatcher (concurrent inferences)
    # goinfer: dynamic batching, for models that define infer_batch (a model may override both):
    BatchSize: 16 # at most this many waiting requests in one infer_batch call
    BatchTimeoutMs: 5 # after the first request, wait at most this long for more
    # goinfer: while requests wait and every worker is busy, a worker takes as many as it expects
    # to run in this many ms (from its recent calls: fast models only) and answers them together
    TakeAheadMs: 1
    MaxQueueLength: 10000 # goinfer: a request finding this many waiting gets QueueFull (9704) at once
    # goinfer: a request a worker took and stopped refreshing this long ago (the worker died or
    # hung) is claimed and run by another worker; one delivered MaxDeliveries times without an
    # answer is answered DeadLettered (9705) and kept in "<stream>:dead" (at most
    # DeadLetterMaxLength entries) with the reason.
    ClaimIdleMs: 3000
    MaxDeliveries: 3
    DeadLetterMaxLength: 10000
    # goinfer: a request is never claimed from a worker that is alive, however long its model
    # runs; one model call running longer than MaxInferSeconds is stuck: its worker is restarted
    # and its requests answered InferFail (9998). 0 = MessageTimeout.
    MaxInferSeconds: 0
    ShutdownGraceS: 30 # goinfer: on SIGTERM, workers get this long to finish what they took
    # goinfer: each dispatcher refreshes its heartbeat key in Redis this often (seconds); the key
    # expires after 3 intervals, so /ready stops counting a killed dispatcher within 3 intervals.
    HeartbeatIntervalS: 5
    # goinfer: 0 = off. Else `goinfer server N` serves Prometheus metrics (worker restarts, live
    # workers, infer time, dead-lettered, deadline-dropped) on http://MetricsAddr:(MetricsPort+N)/metrics.
    MetricsPort: 0
    MetricsAddr: 0.0.0.0
    # goinfer: a worker that dies is restarted after a back-off (0.1 s doubling to 5 s); when
    # more than WorkerRestartLimit die within WorkerRestartWindowS seconds, the dispatcher stops
    # with exit status 1, so that systemd or Kubernetes sees a crash-looping model.
    WorkerRestartLimit: 5
    WorkerRestartWindowS: 60
    # goinfer: every ModelPollS seconds a dispatcher looks for a newer version folder of each model
    # with a ModelBasePath, and for a `goinfer reload`; it then rolls its workers over one at a
    # time (0 = only on SIGHUP).
    ModelPollS: 2
    # goinfer: [] leaves the workers' environment as it is; cpu hides every GPU; [0, 1] spreads
    # the workers over GPUs 0 and 1, each worker seeing only its own (CUDA_VISIBLE_DEVICES).
    Devices: []
    # goinfer: an asynchronous job (POST /goinfer/jobs<api_path>) waits and runs at most JobTimeout
    # seconds (MessageTimeout does not apply); its answer is kept JobResultTTLS seconds.
    JobTimeout: 3600
    JobResultTTLS: 86400

# goinfer: models served by the `goinfer` command, as "package.module:ClassName", or as a mapping
# with Class and how it is served (ModelBasePath, ModelVersion, Warmup, Cache: see the README).
Models:
    - $model

# Error codes and messages returned to clients (go-infer's names and numbers).
ErrCode:
    QueueTimeout: { code: 9997, msg: "queue timeout" }
    InferFail: { code: 9998, msg: "infer fail" }
    UnknownApi: { code: 9999, msg: "unknown api" }
    ApiEntryFail: { code: 9701, msg: "api entry fail" }
    SendMsgFail: { code: 9702, msg: "send message fail" }
    RecvMsgFail: { code: 9703, msg: "receive message fail" }
    UnknownApiPath: { code: 9709, msg: "unknown path" }
    SignFail: { code: 9800, msg: "验签失败" } # signature check failed
    SignFail1: { code: 9801, msg: "缺少参数" } # missing parameter
    SignFail2: { code: 9802, msg: "时间戳错误" } # bad timestamp
    SignFail3: { code: 9803, msg: "签名算法错误" } # bad signature algorithm
    SignFail5: { code: 9805, msg: "AppId错误" } # bad appId
    SignFail6: { code: 9806, msg: "版本号错误" } # bad version
    BodyTooLarge: { code: 9710, msg: "request body too large" } # goinfer
    MethodNotAllowed: { code: 9711, msg: "method not allowed, use POST" } # goinfer
    QueueFull: { code: 9704, msg: "queue full, try again later" } # goinfer
    DeadLettered: { code: 9705, msg: "request set aside after failing in several workers" } # goinfer
    BodyTimeout: { code: 9712, msg: "request body not received in time" } # goinfer
    Replayed: { code: 9807, msg: "request already received" } # goinfer
    TooManyUnverified: { code: 9713, msg: "too many unverified requests in progress, try again later" } # goinfer
    ApiEntryBusy: { code: 9714, msg: "api entry busy, try again later" } # goinfer
    JobExpired: { code: 9715, msg: "job expired before a worker took it" } # goinfer
    JobNotFound: { code: 9716, msg: "job not found" } # goinfer

# Free key-values for your models (self.customer in a Model).
Customer: {
    # "ModelPath": "/srv/models/mymodel.onnx",
}
""")


MODEL_TEMPLATE = f'''\
"""The model this service serves: {MODEL_CLASS} on {API_PATH}.

goinfer imports this module in the HTTP tier (which only calls api_entry) and in every worker
process (init once, then infer per request). Keep heavy imports (torch, tensorflow, onnxruntime)
inside init(), so that the HTTP tier and the dispatcher do not load them.
"""

from __future__ import annotations

from typing import Any

from goinfer import ApiError, Model


class {MODEL_CLASS}(Model):
    api_path = "{API_PATH}"

    def init(self) -> None:
        # Once per worker process, before it takes requests: load the weights here, e.g.
        #     import onnxruntime
        #     self.session = onnxruntime.InferenceSession(self.customer["ModelPath"])
        # self.customer is the settings' Customer: section.
        self.prefix = str(self.customer.get("Prefix", ""))

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        # In the HTTP tier, for each signed request: check `data` and return the parameters put on
        # the queue. ApiError(code, msg) answers the client with that code at once.
        text = data.get("text")
        if not isinstance(text, str):
            raise ApiError(1001, "need text: a string")
        return {{"text": text}}

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        # In a worker: run the model. The returned dict is the answer's data (numpy values are
        # fine); ApiError(code, msg) answers with that code, any other exception with InferFail.
        text = params["text"]
        return {{"text": self.prefix + text, "length": len(text)}}
'''
