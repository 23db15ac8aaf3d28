"""A Python client that signs requests as go-infer's clients do and unwraps the envelope.

Signing uses the string go-infer's server builds (Go's JSON spelling), so any `data` a client
sends verifies on goinfer and on go-infer alike.
"""

from __future__ import annotations

import base64
import hashlib
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
        request = urllib.request.Request(
            self.url + api_path, data=self.body(data), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return unwrap(json.loads(response.read()), response.status)
        except urllib.error.HTTPError as exc:  # 404/405/413 still carry the envelope
            with exc:
                return unwrap(json.loads(exc.read()), exc.code)


class AsyncClient(Client):
    """The same client for asyncio programs (aiohttp); share one per program."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session: Any = None

    async def acall(self, api_path: str, data: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.post(self.url + api_path, data=self.body(data),
                                      headers={"Content-Type": "application/json"}) as response:
            return unwrap(await response.json(content_type=None), response.status)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
