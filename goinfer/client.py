"""A Python client that signs requests as go-infer's clients do and unwraps the envelope.

Signing uses the string go-infer's server builds (Go's JSON spelling), so any `data` a client
sends verifies on goinfer and on go-infer alike. `submit` sends an asynchronous job and returns a
handle in the manner of service_streamer's Future: `result(timeout)` polls the job (any HTTP tier
can answer) with a growing interval until it has its answer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import time
import urllib.error
import urllib.request
from typing import Any, Literal

from goinfer.crypto.sign_string import go_sign_string
from goinfer.crypto.sm2 import private_key_from_b64, sign

SignType = Literal["SM2", "SHA256", "plain"]


class GoinferError(Exception):
    """The server answered with a non-zero code; `code` and `msg` are the envelope's."""

    def __init__(self, code: int, msg: str, request_id: str = "", http_status: int = 200) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
        self.request_id = request_id
        self.http_status = http_status


class JobNotDone(TimeoutError):
    """A job's result() waited its `timeout` out; the job itself goes on (poll it again)."""


def signed_body(
    data: dict[str, Any],
    *,
    app_id: str,
    app_secret: str,
    sign_type: SignType = "SM2",
    sm2_private_key: str | None = None,
    timestamp: int | None = None,
) -> bytes:
    """The JSON body of a signed request, as go-infer's API document specifies it."""
    fields: dict[str, Any] = {
        "appId": app_id,
        "version": "1",
        "signType": sign_type,
        "encType": "plain",
        "timestamp": int(time.time()) if timestamp is None else timestamp,
        "data": data,
    }
    message = go_sign_string(fields, True, fields["timestamp"], app_secret).encode("utf-8")
    if sign_type == "SHA256":
        signature = base64.b64encode(hashlib.sha256(message).hexdigest().encode("ascii")).decode()
    elif sign_type == "SM2":
        if not sm2_private_key:
            raise ValueError("SM2 signing needs the SM2 private key (settings' API.SM2PrivateKey)")
        signature = base64.b64encode(sign(private_key_from_b64(sm2_private_key), message)).decode()
    elif sign_type == "plain":
        signature = ""
    else:
        raise ValueError(f"unknown sign type {sign_type!r}: use SM2, SHA256 or plain")
    fields["signData"] = signature
    return json.dumps(fields, ensure_ascii=False).encode("utf-8")


def unwrap(envelope: dict[str, Any], http_status: int = 200) -> dict[str, Any]:
    """The envelope's `data` on success; GoinferError carrying `code` and `msg` otherwise."""
    data = envelope.get("data") or {}
    if envelope.get("code") != 0:
        raise GoinferError(int(envelope.get("code", -1)), str(data.get("msg", "")),
                           str(data.get("requestId", "")), http_status)
    return data


# Asynchronous jobs (POST /goinfer/jobs<api_path>, then polls of /goinfer/jobs/<job id>).
JOBS_PREFIX = "/goinfer/jobs"
JOB_DONE, JOB_FAILED, JOB_EXPIRED = "done", "failed", "expired"
FINAL_STATES = frozenset({JOB_DONE, JOB_FAILED, JOB_EXPIRED})
# Poll answers that say "not now" rather than anything about the job (ErrCode's defaults: the tier
# could not read Redis; too many unverified requests): result() polls on through them.
RETRY_CODES = frozenset({9703, 9713})
POLL_FIRST_S = 0.05
POLL_MAX_S = 2.0
POLL_GROWTH = 1.5


class Client:
    """A blocking client: `Client(url, app_id, app_secret, ...).call("/api/echo", {...})`."""

    def __init__(self, url: str, app_id: str, app_secret: str, sign_type: SignType = "SM2",
                 sm2_private_key: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.app_id = app_id
        self._secret = app_secret
        self.sign_type = sign_type
        self._sm2_key = sm2_private_key
        self.timeout = timeout

    def body(self, data: dict[str, Any]) -> bytes:
        return signed_body(data, app_id=self.app_id, app_secret=self._secret,
                           sign_type=self.sign_type, sm2_private_key=self._sm2_key)

    def call(self, api_path: str, data: dict[str, Any]) -> dict[str, Any]:
        return unwrap(*self.exchange(api_path, data))

    def submit(self, api_path: str, data: dict[str, Any]) -> JobHandle:
        """Submit `data` to the model at `api_path` as an asynchronous job and return at once;
        the handle's result() waits for its answer (GoinferError when it is refused)."""
        answer = unwrap(*self.exchange(JOBS_PREFIX + api_path, data))
        return JobHandle(self, str(answer["jobId"]), str(answer.get("requestId", "")))

    def job(self, job_id: str) -> JobHandle:
        """The handle of a job submitted earlier (by this appId), e.g. by another process."""
        return JobHandle(self, job_id)

    def exchange(self, path: str, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """POST signed `data` to `path`: the answer's envelope and HTTP status."""
        request = urllib.request.Request(
            self.url + path, data=self.body(data), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read()), response.status
        except urllib.error.HTTPError as exc:  # 404/405/413 still carry the envelope
            with exc:
                return json.loads(exc.read()), exc.code


class JobPoll:
    """What one poll of a job said: its `state`, and once it is final its answer (`data`, as
    `call` returns it) or its `error`. state "" when the tier could not tell now (RETRY_CODES)."""

    def __init__(self, envelope: dict[str, Any], http_status: int = 200) -> None:
        data = envelope.get("data")
        data = data if isinstance(data, dict) else {}
        code = envelope.get("code")
        state = data.get("state")
        self.state: str = state if isinstance(state, str) else ""
        self.data: dict[str, Any] | None = None
        self.error: GoinferError | None = None
        if code == 0:
            if self.state == JOB_DONE:
                self.data = {key: value for key, value in data.items() if key not in ("jobId", "state")}
            return
        error = GoinferError(int(code) if isinstance(code, int) else -1, str(data.get("msg", "")),
                             str(data.get("requestId", "")), http_status)
        if self.state in FINAL_STATES:  # the job failed or expired: that is its answer
            self.error = error
        elif not (code in RETRY_CODES and self.state == ""):
            raise error  # not found (or another appId's), or the poll itself was refused

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def outcome(self) -> dict[str, Any]:
        """The answer's data, or the job's failure raised."""
        if self.error is not None:
            raise self.error
        assert self.data is not None
        return self.data


class _Waiting:
    """The back-off of a handle's polls, and its deadline."""

    def __init__(self, timeout: float | None, job_id: str, patience: float) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._job_id = job_id
        self._delay = POLL_FIRST_S
        self._patience = patience  # how long the tier may stay unreachable
        self._unreachable_since: float | None = None

    def next_delay(self) -> float:
        """Seconds to wait before the next poll; TimeoutError when the deadline has passed."""
        delay, self._delay = self._delay, min(self._delay * POLL_GROWTH, POLL_MAX_S)
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise JobNotDone(f"job {self._job_id} not done within {self._timeout:g}s")
            delay = min(delay, left)
        return delay

    def reached(self) -> None:
        self._unreachable_since = None

    def unreachable(self, exc: BaseException) -> None:
        """A poll that got no answer: polled again (a tier restarting), until `patience` runs out."""
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        elif now - self._unreachable_since > self._patience:
            raise exc


# What a poll that reached no tier raises (refused, reset, timed out, a proxy's bare 502 page).
_UNREACHABLE = (OSError, ValueError, http.client.HTTPException)


class JobHandle:
    """A submitted job, as service_streamer's Future: `result(timeout)` waits for its answer.

    Nothing about the job lives in the client or in any one HTTP tier: a handle made from a job
    id (`Client.job`) in another process, or after the tier that took the job restarted, reads
    the same record.
    """

    def __init__(self, client: Client, job_id: str, request_id: str = "") -> None:
        self.client = client
        self.job_id = job_id
        self.request_id = request_id
        self._final: JobPoll | None = None

    def poll(self) -> JobPoll:
        """Ask once; GoinferError when the job is not found (unknown, forgotten, another appId's)."""
        if self._final is not None:
            return self._final
        answer = JobPoll(*self.client.exchange(f"{JOBS_PREFIX}/{self.job_id}", {"jobId": self.job_id}))
        if answer.final:
            self._final = answer  # its record may be forgotten later; the answer is kept here
        return answer

    def state(self) -> str:
        """queued, running, done, failed or expired ("" when the tier cannot read it just now)."""
        return self.poll().state

    def done(self) -> bool:
        """Whether the job has its answer (done, failed or expired)."""
        return self.poll().final

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The answer's data, as `call` returns it; GoinferError for a failed, expired or unknown
        job, TimeoutError when it is not done within `timeout` seconds (None: wait on)."""
        waiting = _Waiting(timeout, self.job_id, self.client.timeout)
        while True:
            try:
                answer = self.poll()
                waiting.reached()
            except _UNREACHABLE as exc:
                waiting.unreachable(exc)
            else:
                if answer.final:
                    return answer.outcome()
            time.sleep(waiting.next_delay())


class AsyncClient(Client):
    """The same client for asyncio programs (aiohttp); share one per program."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session: Any = None

    async def acall(self, api_path: str, data: dict[str, Any]) -> dict[str, Any]:
        return unwrap(*await self.aexchange(api_path, data))

    async def asubmit(self, api_path: str, data: dict[str, Any]) -> AsyncJobHandle:
        """`submit` for asyncio: the handle's `await result()` waits without blocking the loop."""
        answer = unwrap(*await self.aexchange(JOBS_PREFIX + api_path, data))
        return AsyncJobHandle(self, str(answer["jobId"]), str(answer.get("requestId", "")))

    def ajob(self, job_id: str) -> AsyncJobHandle:
        return AsyncJobHandle(self, job_id)

    async def aexchange(self, path: str, data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.post(self.url + path, data=self.body(data),
                                      headers={"Content-Type": "application/json"}) as response:
            return await response.json(content_type=None), response.status

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class AsyncJobHandle:
    """JobHandle for asyncio: `await handle.result(timeout)`."""

    def __init__(self, client: AsyncClient, job_id: str, request_id: str = "") -> None:
        self.client = client
        self.job_id = job_id
        self.request_id = request_id
        self._final: JobPoll | None = None

    async def poll(self) -> JobPoll:
        if self._final is not None:
            return self._final
        answer = JobPoll(*await self.client.aexchange(f"{JOBS_PREFIX}/{self.job_id}", {"jobId": self.job_id}))
        if answer.final:
            self._final = answer
        return answer

    async def state(self) -> str:
        return (await self.poll()).state

    async def done(self) -> bool:
        return (await self.poll()).final

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        import aiohttp

        waiting = _Waiting(timeout, self.job_id, self.client.timeout)
        while True:
            try:
                answer = await self.poll()
                waiting.reached()
            except (*_UNREACHABLE, aiohttp.ClientError, asyncio.TimeoutError) as exc:
                waiting.unreachable(exc)
            else:
                if answer.final:
                    return answer.outcome()
            await asyncio.sleep(waiting.next_delay())
