"""go-infer's response envelope, byte-compatible in keys and types, and its request ids.

Keys are written sorted, as Go's encoder writes a map, so a client comparing bytes or parsing
with a fixed schema sees what go-infer sent.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from typing import Any

from aiohttp import web

from goinfer import jsoncodec
from goinfer.queue import answer_data, answer_payload

JSON_CONTENT_TYPE = "application/json"
# RecvMsgFail's default code: a reply whose data cannot be written as strict JSON.
UNSENDABLE_REPLY_CODE = 9703


def new_request_id() -> str:
    """go-infer's format: the date as YYYYMMDD, then 32 hex characters."""
    return time.strftime("%Y%m%d") + secrets.token_hex(16)


def _encode(body: dict[str, Any]) -> bytes:
    """Strict JSON in valid UTF-8, always: a lone surrogate in a message (from a model's exception
    text) is written as "?" rather than failing the answer; NaN raises ValueError. The same bytes
    from orjson when they are sure to be the same (jsoncodec.dumps_sorted), ~4 us sooner."""
    fast = jsoncodec.dumps_sorted(body)
    if fast is not None:
        return fast
    text = json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return (text + "\n").encode("utf-8", "replace")


def success(app_id: str, request_id: str, data: dict[str, Any]) -> web.Response:
    data_text = answer_data(request_id, data)
    if data_text is None:
        try:
            data_text = _encode(answer_payload(request_id, data))[:-1]  # without the newline
        except ValueError:  # NaN or Infinity, which only a foreign or outdated worker would send
            return failure(app_id, request_id, UNSENDABLE_REPLY_CODE,
                           "receive message fail : reply data is not valid JSON")
    return answered(app_id, data_text)


def answered(app_id: str, data_text: bytes) -> web.Response:
    """The success envelope around `data_text` (queue.answer_data: sorted, with msg and
    requestId), the bytes `_encode` would write for the whole body: keys in sorted order."""
    body = b"".join((b'{"appId":', _string(app_id), b',"code":0,"data":', data_text,
                     b',"encType":"plain","signType":"plain","success":true,"timestamp":',
                     str(int(time.time())).encode(), b"}\n"))
    return web.Response(body=body, content_type=JSON_CONTENT_TYPE)


@functools.lru_cache(maxsize=1024)  # the appIds of the settings: only known ones are answered a success
def _string(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode("utf-8", "replace")


def failure(app_id: str, request_id: str, code: int, msg: str, status: int = 200,
            extra: dict[str, Any] | None = None) -> web.Response:
    """`extra`: more fields in `data` (an asynchronous job's jobId and state), beside msg and requestId."""
    body = {
        "code": code,
        "appId": app_id,
        "signType": "plain",
        "encType": "plain",
        "success": False,
        "timestamp": int(time.time()),
        "data": {**(extra or {}), "msg": msg, "requestId": request_id},
    }
    return web.Response(status=status, body=_encode(body), content_type=JSON_CONTENT_TYPE)
