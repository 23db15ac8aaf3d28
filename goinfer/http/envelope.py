"""go-infer's response envelope, byte-compatible in keys and types, and its request ids.

Keys are written sorted, as Go's encoder writes a map, so a client comparing bytes or parsing
with a fixed schema sees what go-infer sent.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from aiohttp import web

from goinfer import jsoncodec

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
    payload = dict(data)
    payload["msg"] = "success"
    payload["requestId"] = request_id
    body = {
        "code": 0,
        "appId": app_id,
        "signType": "plain",
        "encType": "plain",
        "success": True,
        "timestamp": int(time.time()),
        "data": payload,
    }
    try:
        encoded = _encode(body)
    except ValueError:  # NaN or Infinity, which only a foreign or outdated worker would send
        return failure(app_id, request_id, UNSENDABLE_REPLY_CODE, "receive message fail : reply data is not valid JSON")
    return web.Response(body=encoded, content_type=JSON_CONTENT_TYPE)


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
