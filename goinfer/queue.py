"""The contract between the HTTP tier and the dispatchers: Redis key names and message formats.

Both tiers import this module and never each other. Requests travel on one Redis stream per
queue (`QueueName` + N, go-infer's channel names) read by a consumer group, so a request waits
in Redis until some worker takes it; answers go back on one list per HTTP process, matched by
request id. Messages are JSON, never pickle: Redis content must not be able to run code.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

CONSUMER_GROUP = "goinfer"
JOB_FIELD = "m"
REPLY_KEY_PREFIX = "goinfer:reply:"
# A reply list outlives a vanished HTTP process by this long, then Redis frees it.
REPLY_TTL_S = 300


DEAD_LETTER_SUFFIX = ":dead"
REPLAY_KEY_PREFIX = "goinfer:seen:"


def dead_letter_stream(stream: str) -> str:
    """Where requests that kept killing workers are kept, with the reason, for a person to see."""
    return f"{stream}{DEAD_LETTER_SUFFIX}"


def replay_key(app_id: str, sign_data: str) -> str:
    """One key per signature; hashed, so a huge signData cannot make a huge key."""
    digest = hashlib.sha256(sign_data.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{REPLAY_KEY_PREFIX}{app_id}:{digest}"


def stream_name(queue_base: str, index: int) -> str:
    """go-infer's queue naming: the base name followed by the queue number."""
    return f"{queue_base}{index}"


def reply_key(http_process_id: str) -> str:
    return f"{REPLY_KEY_PREFIX}{http_process_id}"


def choose_stream(queue_base: str, queue_amount: int) -> str:
    """A uniformly random queue of the `RequestQueueAmount`, as go-infer spreads requests."""
    return stream_name(queue_base, random.randrange(queue_amount))


@dataclass(frozen=True)
class Job:
    """One request on its way to a worker."""

    id: str
    api: str
    params: dict[str, Any]
    reply_to: str
    deadline: float  # unix time after which the client has been answered with QueueTimeout

    def encode(self) -> str:
        return json.dumps(
            {"id": self.id, "api": self.api, "params": self.params, "reply_to": self.reply_to,
             "deadline": self.deadline},
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> "Job":
        fields = json.loads(raw)
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
        )

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.deadline


@dataclass(frozen=True)
class Reply:
    """A worker's answer: code 0 with `data`, or an error code with `msg`."""

    id: str
    code: int
    msg: str = ""
    data: dict[str, Any] | None = None

    def encode(self) -> str:
        body: dict[str, Any] = {"id": self.id, "code": self.code}
        if self.code:
            body["msg"] = self.msg
        else:
            body["data"] = self.data or {}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=_plain_json)

    @classmethod
    def decode(cls, raw: bytes | str) -> "Reply":
        fields = json.loads(raw)
        return cls(
            id=str(fields["id"]),
            code=int(fields["code"]),
            msg=str(fields.get("msg", "")),
            data=fields.get("data"),
        )


def _plain_json(value: Any) -> Any:
    """Let models return numpy arrays and scalars, the common case, without converting by hand."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
