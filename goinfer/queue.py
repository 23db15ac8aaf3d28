"""The contract between the HTTP tier and the dispatchers: Redis key names and message formats.

Both tiers import this module and never each other. Requests travel on one Redis stream per
queue (`QueueName` + N, go-infer's channel names, after a hash tag) read by a consumer group, so
a request waits in Redis until some worker takes it; answers go back on one list per HTTP process
and queue, matched by request id. Messages are JSON, never pickle: Redis content must not be able to run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from goinfer import jsoncodec

CONSUMER_GROUP = "goinfer"
JOB_FIELD = "m"
REPLY_KEY_PREFIX = "goinfer:reply:"
ALIVE_KEY_PREFIX = "goinfer:alive:"
# A reply list outlives a vanished HTTP process by this long, then Redis frees it.
REPLY_TTL_S = 300


DEAD_LETTER_SUFFIX = ":dead"
REPLAY_KEY_PREFIX = "goinfer:seen:"

# Dispatcher heartbeats: each `goinfer server N` supervisor keeps one key, JSON, refreshed every
# Server.HeartbeatIntervalS, that expires after HEARTBEAT_TTL_INTERVALS missed refreshes (killed,
# frozen, cut off from Redis), and names it in one set so readers find every dispatcher without
# SCANning the keyspace. Readers skip members whose key has expired; writers prune them.
# The keys and the set share one hash tag: the script that prunes the set and the MGET that
# reads every heartbeat then touch one slot, which a Redis Cluster requires.
DISPATCHERS_TAG = "{dispatchers}"
DISPATCHER_KEY_PREFIX = f"goinfer:{DISPATCHERS_TAG}:"
DISPATCHERS_SET = f"goinfer:{DISPATCHERS_TAG}"
HEARTBEAT_TTL_INTERVALS = 3

# `goinfer reload` increments this counter; every dispatcher polls it (Server.ModelPollS) and,
# when it has changed since it last looked, rolls its workers over to fresh processes (new model
# code, the version folders read again). Same hash tag as the heartbeats: one primary holds them.
RELOAD_KEY = f"goinfer:reload:{DISPATCHERS_TAG}"

# The shared level of the result cache: one string per answer, with the model's CacheTTLS.
RESULT_CACHE_PREFIX = "goinfer:cache:"

# Priority lanes. Beside each stream (go-infer's name: the lane of live, synchronous requests)
# are two more, for work nobody waits on at once: asynchronous jobs, then offline batch rows.
# Workers take from the highest lane that holds something, so a batch of a million rows never
# makes live requests wait for more than the batch a worker already holds. The lanes of a
# stream share its hash tag (its queue's slot).
PRIORITY_HIGH = "high"
PRIORITY_NORMAL = "normal"
PRIORITY_LOW = "low"
PRIORITIES = (PRIORITY_HIGH, PRIORITY_NORMAL, PRIORITY_LOW)  # the order workers read them in

# Asynchronous jobs: a job is a request whose answer is kept in a hash (`job_key`) instead of
# sent to a waiting HTTP process, so any tier can answer a poll of it, later, after restarts.
JOB_KEY_PREFIX = "goinfer:job:"
JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_EXPIRED = "expired"  # its JobTimeout passed before a worker took it
JOB_STATES = (JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED, JOB_EXPIRED)

# Cluster-wide counters per stream, a hash incremented by workers in the pipeline that
# acknowledges the entries concerned, so every HTTP tier can show the totals.
STATS_KEY_PREFIX = "goinfer:stats:"
STAT_DEAD_LETTERED = "dead_lettered"
STAT_DEADLINE_DROPPED = "deadline_dropped"
# Requests skipped unrun because the HTTP process waiting for them is gone (its tier_alive_key expired).
STAT_ORPHANED = "orphaned"


# Redis Cluster puts a key in the hash slot of the text between its first "{" and "}" (its hash
# tag). Every key of queue number N carries the tag {qN}: its streams (the default queue's and each
# model queue's), their dead-letter streams and stats, the replay keys of requests sent to it, and
# the reply lists its workers answer on. So everything one command, script or MULTI/EXEC of a
# queue touches lives in one slot (no CROSSSLOT), and the queues, not the keys of one queue, are
# what Redis Cluster spreads over its primaries. On a single Redis the tags are just part of the
# names. "q" because {q0}, {q1}, {q2} fall in the three thirds of the slot space that
# `redis-cli --cluster create` gives three primaries.
def queue_tag(index: int) -> str:
    """The hash tag every key of queue number `index` carries."""
    return f"{{q{index}}}"


def dead_letter_stream(stream: str) -> str:
    """Where requests that kept killing workers are kept, with the reason, for a person to see."""
    return f"{stream}{DEAD_LETTER_SUFFIX}"


def replay_target(app_id: str, sign_data: str, queue_amount: int) -> tuple[int, str]:
    """The queue number a signed request goes to, and its replay key, both from its signature.

    One key per signature, hashed, so a huge signData cannot make a huge key. The key must be in
    the slot of the stream it is checked with (one script does both), so a replayed signature has
    to land on the same queue number every time: the number is taken from the digest, not drawn
    at random. Signatures are unpredictable, so the queues still share the load evenly.
    """
    digest = hashlib.sha256(sign_data.encode("utf-8", "surrogatepass")).hexdigest()
    index = int(digest[:16], 16) % queue_amount
    return index, f"{REPLAY_KEY_PREFIX}{queue_tag(index)}:{app_id}:{digest}"


def dispatcher_key(host: str, pid: int) -> str:
    """The heartbeat key of one dispatcher (supervisor process)."""
    return f"{DISPATCHER_KEY_PREFIX}{host}:{pid}"


def model_revision(version: int | None, code_digest: str) -> str:
    """What computed an answer: the version folder's number ("-" without ModelBasePath) and a
    digest of the model's source file, so that a reload of new code is a new revision too."""
    return f"{'-' if version is None else version}:{code_digest}"


def revision_version(revision: str | None) -> str | None:
    """The version number of a revision, as the X-Goinfer-Model-Version header shows it; None
    for a model served without versions (or an answer from an older worker)."""
    if not revision:
        return None
    number = revision.split(":", 1)[0]
    return number if number.isdigit() else None


def result_cache_key(api: str, revision: str, cache_key: str) -> str:
    """The shared cache's key for the answer of `api` at `revision` to params whose Model.cache_key
    is `cache_key`: hashed, so that hostile params never make a long or odd key."""
    digest = hashlib.sha256(cache_key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{RESULT_CACHE_PREFIX}{api}:{revision}:{digest}"


def heartbeat_ttl_s(interval_s: float) -> int:
    """Seconds a heartbeat key lives: a few intervals, so one slow write does not expire it."""
    return max(1, math.ceil(HEARTBEAT_TTL_INTERVALS * interval_s))


def stats_key(stream: str) -> str:
    """The hash of cluster-wide counters of one stream (STAT_* fields)."""
    return f"{STATS_KEY_PREFIX}{stream}"


def stream_name(queue_base: str, index: int) -> str:
    """go-infer's queue naming (the base name followed by the queue number), after the queue's
    hash tag: "{q0}goinfer0". The tag comes first so that no brace in a QueueName can move it."""
    return f"{queue_tag(index)}{queue_base}{index}"


# An HTTP process proves it still reads its reply list by refreshing this key every
# TIER_ALIVE_REFRESH_S; it expires TIER_ALIVE_TTL_S after the process died (kill -9 included), so
# a worker can skip a request whose client is gone instead of running it for nobody.
TIER_ALIVE_REFRESH_S = 1.0
TIER_ALIVE_TTL_S = 5


def tier_alive_key(http_process_id: str) -> str:
    """The liveness key of one HTTP process; in no queue's slot (a worker reads it on its own)."""
    return f"{ALIVE_KEY_PREFIX}{http_process_id}"


def reply_key(http_process_id: str, index: int) -> str:
    """The list on which one HTTP process receives the answers of the requests it sent to queue
    number `index`: one per queue, so a worker's answer and acknowledgement share a slot."""
    return f"{REPLY_KEY_PREFIX}{queue_tag(index)}:{http_process_id}"


def streams_for(default_queue: str, model_queues: Iterable[str | None], indexes: Iterable[int], *,
                with_default: bool = False) -> list[str]:
    """The streams that carry requests of models on `model_queues` (None: the default queue),
    for the queue numbers `indexes`: base name + N, the default queue's first, then sorted.

    The HTTP tier sends each routed model's requests to its queue for every N; dispatcher N
    reads the same names for its one N, and the default queue even when all its models have
    their own (`with_default`), as go-infer's dispatcher always subscribes to it. One function
    for both, so the two sides can never disagree on a name.
    """
    bases = {queue or default_queue for queue in model_queues}
    if with_default:
        bases.add(default_queue)
    ordered = sorted(bases, key=lambda base: (base != default_queue, base))
    return [stream_name(base, index) for base in ordered for index in indexes]


# How every sender puts a request on a stream (the HTTP tier, `goinfer batch`), in one atomic
# round trip: refuse a replayed signature (KEYS[2], when given, SET NX EX ARGV[3]), refuse when
# the stream holds MaxQueueLength (ARGV[1]) entries, else XADD the Job (ARGV[2]) under JOB_FIELD
# (ARGV[4]). Returns QUEUED, QUEUE_FULL or REPLAYED.
ENQUEUE_SCRIPT = """
if #KEYS > 1 and not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  return -2
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  if #KEYS > 1 then redis.call('DEL', KEYS[2]) end
  return -1
end
redis.call('XADD', KEYS[1], '*', ARGV[4], ARGV[2])
return 1
"""
ENQUEUE_SHA = hashlib.sha1(ENQUEUE_SCRIPT.encode()).hexdigest()
QUEUED, QUEUE_FULL, REPLAYED = 1, -1, -2


def lane_stream(stream: str, priority: str) -> str:
    """The stream of `priority`'s lane beside `stream` (which is the high lane itself)."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; expected one of {', '.join(PRIORITIES)}")
    return stream if priority == PRIORITY_HIGH else f"{stream}:{priority}"


def with_lanes(streams: Iterable[str]) -> list[str]:
    """Every lane of `streams`, highest priority first: what a worker reads, in that order."""
    streams = list(streams)
    return [lane_stream(stream, priority) for priority in PRIORITIES for stream in streams]


_JOB_ID = re.compile(r"([0-9]{8}[0-9a-f]{32})\.([0-9]{1,4})")


def job_id(request_id: str, index: int) -> str:
    """The id a client polls a job by: its request id and its queue number, which names the
    slot its record lives in (any tier can find it)."""
    return f"{request_id}.{index}"


def parse_job_id(text: str) -> tuple[str, int] | None:
    """(request id, queue number) of a job id; None for anything else (answered "not found")."""
    match = _JOB_ID.fullmatch(text) if isinstance(text, str) else None
    return (match.group(1), int(match.group(2))) if match else None


def job_key(request_id: str, index: int) -> str:
    """The hash holding a job's state and answer, in its queue's slot: the worker writes the
    answer in the same MULTI/EXEC that acknowledges the entry."""
    return f"{JOB_KEY_PREFIX}{queue_tag(index)}:{request_id}"


@dataclass(frozen=True)
class JobRecord:
    """A job's hash, as the HTTP tier writes it at submission and workers update it.

    Fields are text (HSET): `state`; `app_id` (who may read it); `api`; `created`, `started`,
    `finished` (unix times); `reply`, the Reply JSON once it is done or failed. The hash expires
    Server.JobResultTTLS after the answer (or the expiry), JobTimeout + JobResultTTLS after
    submission while it waits.
    """

    state: str
    app_id: str
    api: str
    created: float
    started: float | None = None
    finished: float | None = None
    reply: Reply | None = None

    def fields(self) -> dict[str, str]:
        body = {"state": self.state, "app_id": self.app_id, "api": self.api, "created": repr(self.created)}
        if self.started is not None:
            body["started"] = repr(self.started)
        if self.finished is not None:
            body["finished"] = repr(self.finished)
        if self.reply is not None:
            body["reply"] = self.reply.encode()
        return body

    @classmethod
    def decode(cls, raw: Mapping[bytes | str, bytes | str]) -> JobRecord | None:
        """The record in an HGETALL answer; None when it is empty or not a job's."""
        text = {_str(k): _str(v) for k, v in raw.items()}
        if text.get("state") not in JOB_STATES or "app_id" not in text or "api" not in text:
            return None
        try:
            reply = Reply.decode(text["reply"]) if "reply" in text else None
            return cls(text["state"], text["app_id"], text["api"], float(text.get("created", 0)),
                       _float_or_none(text.get("started")), _float_or_none(text.get("finished")), reply)
        except (KeyError, ValueError, TypeError):
            return None


def job_started_fields(now: float) -> dict[str, str]:
    """What a worker sets when it starts a job."""
    return {"state": JOB_RUNNING, "started": repr(now)}


def job_finished_fields(reply: str, code: int, now: float) -> dict[str, str]:
    """What a worker sets with the answer (`reply`, an encoded Reply whose code is `code`)."""
    return {"state": JOB_DONE if code == 0 else JOB_FAILED, "finished": repr(now), "reply": reply}


def job_expired_fields(now: float) -> dict[str, str]:
    return {"state": JOB_EXPIRED, "finished": repr(now)}


def _str(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _float_or_none(value: str | None) -> float | None:
    return None if value is None else float(value)


def choose_queue(queue_amount: int) -> int:
    """A uniformly random queue number of the `RequestQueueAmount`, as go-infer spreads requests
    (for requests without a replay key; see `replay_target`)."""
    return random.randrange(queue_amount)


@dataclass(frozen=True)
class Job:
    """One request on its way to a worker."""

    id: str
    api: str
    params: dict[str, Any]
    reply_to: str
    deadline: float  # unix time after which the client has been answered with QueueTimeout
    # The sender's tier_alive_key, when it keeps one: a worker skips the job once it has expired.
    # None from senders that keep none, whose jobs are never skipped for it.
    alive_key: str | None = None
    # An asynchronous job's record (job_key): the answer is written there, not sent to reply_to
    # (which is ""); the job has no waiting client, so never an alive_key.
    job_key: str | None = None

    def encode(self) -> str:
        body: dict[str, Any] = {"id": self.id, "api": self.api, "params": self.params, "reply_to": self.reply_to,
                                "deadline": self.deadline}
        if self.alive_key is not None:
            body["alive"] = self.alive_key
        if self.job_key is not None:
            body["job"] = self.job_key
        return _dumps(body, "params")

    @classmethod
    def decode(cls, raw: bytes | str) -> Job:
        fields = _json(raw)
        if not isinstance(fields, dict):
            raise ValueError("job is not a JSON object")
        params = fields.get("params")
        if not isinstance(params, dict):
            raise ValueError("job params is not an object")
        return cls(
            id=str(fields["id"]),
            api=str(fields["api"]),
            params=params,
            reply_to=str(fields["reply_to"]),
            deadline=float(fields["deadline"]),
            alive_key=str(fields["alive"]) if isinstance(fields.get("alive"), str) else None,
            job_key=str(fields["job"]) if isinstance(fields.get("job"), str) else None,
        )

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.deadline


# A success's `data` travels as the HTTP tier will send it, after this mark and last in the reply,
# so that the tier copies it into its answer unread (see `answer_data`).
ANSWER_MARK = ',"answer":1,"data":'
_ANSWER_MARK_BYTES = ANSWER_MARK.encode()
# What the HTTP tier adds to a success's data: a model's own keys of these names never get through.
ANSWER_KEYS = ("msg", "requestId")


def answer_data(request_id: str, data: Mapping[str, Any], default: Callable[[Any], Any] | None = None) -> bytes | None:
    """The `data` object of go-infer's success envelope, byte for byte as the HTTP tier sends it:
    `data` with msg "success" and the requestId, keys sorted, floats and strings as Python's
    json module writes them (the envelope's spelling, envelope.py). None when orjson may write
    it otherwise (a null, which may stand for NaN; a quote inside a string; ...): then the json
    module writes it.

    A worker writes it once and the HTTP tier copies it: a 384-float embedding is then neither
    read nor written again in the HTTP process, which cost it ~25 % of its CPU per request.
    """
    text = jsoncodec.dumps_sorted(answer_payload(request_id, data), default)
    return None if text is None else text[:-1]  # without the newline


def answer_payload(request_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """A success's `data` as the envelope holds it: the model's, with msg and requestId set."""
    return {**data, "msg": "success", "requestId": request_id}


@dataclass(frozen=True)
class Reply:
    """A worker's answer: code 0 with `data`, or an error code with `msg`.

    `queued_ms` (from the entry's XADD until a worker started it) and `infer_ms` (the model's
    `infer`/`infer_batch` call) travel with the answer so the HTTP tier can observe where a
    request's time went without asking anyone; None when unknown (an older worker).

    `answer`: a success's data as the HTTP tier sends it (`answer_data`), when the worker wrote
    it so. `decode(..., keep_answer=True)` leaves it unread (`data` None; `plain_data()` reads
    it); every other reader gets `data` as the model returned it.
    """

    id: str
    code: int
    msg: str = ""
    data: dict[str, Any] | None = None
    queued_ms: float | None = None
    infer_ms: float | None = None
    revision: str | None = None  # model_revision() of the model that computed it
    # How the data travelled, not what it is: two replies with the same data are equal.
    answer: bytes | None = field(default=None, compare=False, repr=False)

    def encode(self) -> str:
        """Strict JSON in valid UTF-8; ValueError for `data` that cannot be that.

        An error's `msg` never fails: it is made valid UTF-8, so an error can always be answered.
        A success's data is written as the HTTP tier sends it (`answer_data`), after every other
        field, unless the model's data uses a key the tier sets itself (or orjson cannot write
        it so): then as before, which every reader also reads.
        """
        body: dict[str, Any] = {"id": self.id, "code": self.code}
        if self.code:
            body["msg"] = _valid_utf8(self.msg)
        if self.queued_ms is not None:
            body["queued_ms"] = round(self.queued_ms, 3)
        if self.infer_ms is not None:
            body["infer_ms"] = round(self.infer_ms, 3)
        if self.revision is not None:
            body["rev"] = self.revision
        if self.code:
            return _dumps(body, "the result")
        data = self.data or {}
        if isinstance(data, dict) and not any(key in data for key in ANSWER_KEYS):
            answer = answer_data(self.id, data, _plain_json)
            if answer is not None:
                return _dumps(body, "the result")[:-1] + ANSWER_MARK + answer.decode("utf-8") + "}"
        body["data"] = data
        return _dumps(body, "the result", default=_plain_json)

    @classmethod
    def decode(cls, raw: bytes | str, keep_answer: bool = False) -> Reply:
        split = _split_answer(raw)
        if split is None:
            fields = _json(raw)
            if not isinstance(fields, dict):
                raise ValueError("reply is not a JSON object")
            data, answer = fields.get("data"), None
        else:
            fields, answer = split
            data = None if keep_answer else _model_data(answer)
        return cls(
            id=str(fields["id"]),
            code=_int(fields["code"]),
            msg=str(fields.get("msg", "")),
            data=data,
            queued_ms=_optional_ms(fields.get("queued_ms")),
            infer_ms=_optional_ms(fields.get("infer_ms")),
            revision=fields["rev"] if isinstance(fields.get("rev"), str) else None,
            answer=answer,
        )

    def plain_data(self) -> Any:
        """`data` as the model returned it, read from `answer` when it was kept unread."""
        if self.data is None and self.answer is not None:
            return _model_data(self.answer)
        return self.data


def _split_answer(raw: bytes | str) -> tuple[dict[str, Any], bytes] | None:
    """(the other fields, the answer) of a reply written with ANSWER_MARK; None for any other.

    Inside a JSON string every quote is escaped, so the mark's first occurrence is a key: the
    header's, or, in a reply written the older way, one inside `data`; what precedes it is then
    no JSON object without a "data" key, and the reply is read whole.
    """
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            return None
    head, mark, tail = raw.partition(_ANSWER_MARK_BYTES)
    if not mark or tail[:1] != b"{" or tail[-1:] != b"}":
        return None
    try:
        fields = _json(head + b"}")
    except ValueError:
        return None
    if not isinstance(fields, dict) or "data" in fields:
        return None
    return fields, tail[:-1]


def _model_data(answer: bytes) -> Any:
    data = _json(answer)
    if isinstance(data, dict):
        for key in ANSWER_KEYS:
            data.pop(key, None)
    return data


def deliver_reply(raw: bytes | str, waiting: Mapping[str, Any], keep_answer: bool = False) -> Reply:
    """Hand a reply read from a reply list to the future waiting for its request id, if one
    still waits (it may have timed out). Every reader of reply lists matches answers this way;
    `keep_answer`: see Reply.

    Raises ValueError for something that is not a reply: the caller logs it and reads on.
    """
    try:
        reply = Reply.decode(raw, keep_answer)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a reply: {type(exc).__name__}: {exc}") from None
    future = waiting.get(reply.id)
    if future is not None and not future.done():
        future.set_result(reply)
    return reply


def _dumps(body: dict[str, Any], what: str, default: Callable[[Any], Any] | None = None) -> str:
    """The message as strict JSON (RFC 8259) in valid UTF-8, or ValueError saying why `what`
    (the part that comes from a model) cannot be sent.

    Python's json would write NaN and Infinity, which no strict parser reads (a client would get
    a body it cannot parse), and lone surrogates, which cannot be encoded as UTF-8 at all (Redis's
    client would fail the whole pipeline the message travels in); nesting deeper than the
    recursion limit raises RecursionError, which callers catching ValueError would miss.
    """
    try:
        text = jsoncodec.dumps(body, default)
    except RecursionError:
        raise ValueError(f"{what} cannot be sent as JSON: it is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        reason = "it holds NaN or Infinity" if "Out of range float" in str(exc) else str(exc)
        raise ValueError(f"{what} cannot be sent as JSON: {reason}") from None
    if not text.isascii():  # O(1) for the common case; only non-ASCII text can hold a lone surrogate
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{what} cannot be sent as JSON: it holds the lone surrogate "
                             f"U+{ord(exc.object[exc.start]):04X}, which is not valid UTF-8") from None
    return text


def _valid_utf8(text: str) -> str:
    """`text` with any lone surrogate written as its escape (\\ud800), so it can be sent."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json(raw: bytes | str) -> Any:
    """json.loads (jsoncodec's: the same values, faster) for what comes out of Redis: hostile
    nesting is a ValueError like any bad JSON, not the RecursionError json raises for it."""
    try:
        return jsoncodec.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _int(value: Any) -> int:
    """int() whose every failure is a ValueError or TypeError (1e999 parses as infinity)."""
    try:
        return int(value)
    except OverflowError:
        raise ValueError(f"not a finite number: {value!r}") from None


def entry_time_ms(entry_id: bytes | str) -> float:
    """When Redis added a stream entry: the millisecond part of its id ("1718000000000-0")."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return float(text.split("-", 1)[0])


def _optional_ms(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _plain_json(value: Any) -> Any:
    """Let models return numpy arrays and scalars, the common case, without converting by hand."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


STATE_LOADING = "loading"
STATE_SERVING = "serving"


@dataclass(frozen=True)
class DispatcherHeartbeat:
    """What a dispatcher says about itself in its heartbeat key (`dispatcher_key`), as JSON.

    Written by the dispatcher's supervisor, read by every HTTP tier for /ready, /metrics and
    /goinfer/status. Decoding keeps only these fields, each checked for its type, so that
    nothing else that lands in such a key can reach a client. Never holds a secret.
    """

    host: str = ""
    pid: int = 0
    queue_index: int = 0
    streams: tuple[str, ...] = ()  # as the workers report them: the supervisor imports no model
    apis: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    max_workers: int = 0
    live_workers: int = 0  # workers with their models initialised that have not died since
    restarts: int = 0
    metrics_port: int | None = None
    version: str = ""
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    heartbeat_interval_s: float = 0.0
    # "loading" from the dispatcher's start until all its first workers have loaded their models
    # (live_workers of max_workers so far, for loading_s seconds), then "serving" for good: a
    # dispatcher that is loading is not counted by /ready, but is told apart from one absent.
    state: str = STATE_SERVING
    loading_s: float = 0.0
    # Per api path, the model_revision() that new workers serve (set when the first worker on it
    # is ready) and when the last one changed: the result cache keys answers by it.
    revisions: dict[str, str] = field(default_factory=dict)
    revision_at: float = 0.0
    devices: tuple[str, ...] = ()  # per worker slot, the device it runs on ("cpu", "0", ...); () when not placed
    rollout: str = ""  # what a version rollover is doing now, for people
    reload_error: str = ""  # why the last new version or reload was refused ("" when none was)

    @property
    def name(self) -> str:
        """How metrics and logs name this dispatcher: host:pid."""
        return f"{self.host}:{self.pid}"

    @property
    def serving(self) -> bool:
        """Done loading, and at least one worker can take requests now."""
        return self.state != STATE_LOADING and self.live_workers >= 1

    @property
    def loading(self) -> bool:
        return self.state == STATE_LOADING

    def as_json(self) -> dict[str, Any]:
        body = asdict(self)
        for name in _HEARTBEAT_LISTS:
            body[name] = list(body[name])
        return body

    def encode(self) -> str:
        return json.dumps(self.as_json(), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: bytes | str) -> DispatcherHeartbeat | None:
        """The heartbeat in `raw`, or None when it is not one; fields of the wrong type are dropped."""
        try:
            body = _json(raw)
        except (ValueError, TypeError):
            return None
        if not isinstance(body, dict):
            return None
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.name not in body:
                continue
            value = _heartbeat_field(spec.name, body[spec.name])
            if value is not None:
                values[spec.name] = value
        return cls(**values)


_HEARTBEAT_LISTS = ("streams", "apis", "models", "devices")
_HEARTBEAT_TYPES: dict[str, type | tuple[type, ...]] = {
    "host": str, "pid": int, "queue_index": int, "max_workers": int, "live_workers": int, "restarts": int,
    "metrics_port": int, "version": str, "started_at": (int, float), "heartbeat_at": (int, float),
    "heartbeat_interval_s": (int, float), "state": str, "loading_s": (int, float), "revision_at": (int, float),
    "rollout": str, "reload_error": str,
}


def _heartbeat_field(name: str, value: Any) -> Any:
    if name in _HEARTBEAT_LISTS:
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        return None
    if name == "revisions":
        if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            return dict(value)
        return None
    expected = _HEARTBEAT_TYPES[name]
    if isinstance(value, bool) or not isinstance(value, expected):
        return None
    if expected == (int, float) and isinstance(value, (int, float)):
        return float(value)  # JSON writes a whole float as an int
    return value


def served_streams(dispatchers: Iterable[DispatcherHeartbeat]) -> dict[str, int]:
    """Stream -> how many dispatchers with at least one live worker read it."""
    served: dict[str, int] = {}
    for beat in dispatchers:
        if beat.serving:
            for stream in beat.streams:
                served[stream] = served.get(stream, 0) + 1
    return served
