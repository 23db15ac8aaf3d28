"""go-infer's own signed requests, through goinfer's real HTTP tier, queue and dispatcher.

The HTTP tier runs in this process so the vectors' fixed "now" can be handed to its signature
check; everything else is real: a socket, Redis, and a `goinfer server` process answering.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from goinfer.crypto.gojson import parse_request_body
from goinfer.crypto.sign_string import go_sign_string
from goinfer.http.server import build_app
from goinfer.models.registry import resolve_models
from goinfer.settings import load_settings

from conftest import free_port, write_settings

# Deliberate, documented differences from go-infer (README, "Differences from go-infer").
ACCEPTED_DESPITE_GO = "invalid-client-marshal-mismatch"
REFUSED_NESTING = {"deep_nesting_1500_go_signed": 9801}


def expected_code(vector: dict[str, Any]) -> int:
    if vector["id"] in REFUSED_NESTING:
        return REFUSED_NESTING[vector["id"]]
    if vector["category"] == ACCEPTED_DESPITE_GO:
        return 0
    return vector["expected_code"]


def body_of(vector: dict[str, Any]) -> bytes:
    return base64.b64decode(vector["body_b64"])


def test_every_vector_has_an_expectation(vectors):
    assert len(vectors["vectors"]) == 96
    categories = {v["category"] for v in vectors["vectors"]}
    assert ACCEPTED_DESPITE_GO in categories


def test_string_to_sign_is_go_infers(vectors):
    """Where go-infer got as far as building its string, ours is the same, byte for byte."""
    checked = 0
    for vector in vectors["vectors"]:
        if vector.get("sign_string") is None or vector["id"] in REFUSED_NESTING:
            continue
        parsed = parse_request_body(body_of(vector), max_depth=512)
        fields = parsed.value
        secret = vectors["settings"]["AppIdSecret"].get(fields["appId"], "")
        timestamp = int(fields["timestamp"])
        built = go_sign_string(fields, parsed.go_numbers_differ, timestamp, secret)
        assert built == vector["sign_string"], vector["id"]
        checked += 1
    assert checked >= 60


def _vector_settings(tmp_path: Path, vectors: dict[str, Any], redis_address: str) -> Path:
    settings = vectors["settings"]
    return write_settings(
        tmp_path,
        redis_address,
        API={
            "SM2PrivateKey": settings["SM2PrivateKey"],
            "AppIdSecret": settings["AppIdSecret"],
            "AllowSignPlain": settings["AllowSignPlain"],
            "RequestTimestampDiff": vectors["RequestTimestampDiff"],
        },
        Models=["goinfer.models.echo:Echo"],
    )


async def _post_all(settings_path: Path, vectors: dict[str, Any]) -> dict[str, tuple[int, dict]]:
    settings = load_settings(str(settings_path))
    now = {"value": float(vectors["now"])}
    app = build_app(settings, resolve_models(settings.models), clock=lambda: now["value"])
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    results: dict[str, tuple[int, dict]] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for vector in vectors["vectors"]:
                now["value"] = float(vector.get("now", vectors["now"]))
                async with session.post(f"http://127.0.0.1:{port}/api/echo", data=body_of(vector)) as response:
                    results[vector["id"]] = (response.status, await response.json())
    finally:
        await runner.cleanup()
    return results


def _echo_expected(vector: dict[str, Any]) -> dict[str, Any]:
    """The `data` the echo model must return: the request's data as Go decoded it."""
    if "invalid_utf8" in vector["id"]:
        return None  # checked separately below
    # Go decodes an unpaired surrogate escape (\ud800, \udc00) to U+FFFD.
    return json.loads(vector["body"], object_hook=lambda obj: {
        key: re.sub("[\ud800-\udfff]", "\ufffd", value) if isinstance(value, str) else value
        for key, value in obj.items()
    })["data"]


def test_vectors_through_the_http_tier(tmp_path, vectors, redis_server, processes):
    settings_path = _vector_settings(tmp_path, vectors, redis_server.address)
    processes.server(settings_path, 0)
    results = asyncio.run(_post_all(settings_path, vectors))

    mismatches = []
    for vector in vectors["vectors"]:
        status, envelope = results[vector["id"]]
        want = expected_code(vector)
        if envelope["code"] != want or status != 200:
            mismatches.append((vector["id"], want, status, envelope["code"], envelope["data"].get("msg")))
            continue
        if want == 0:
            data = dict(envelope["data"])
            assert data.pop("msg") == "success"
            data.pop("requestId")
            expected = _echo_expected(vector)
            if expected is None:
                # Go replaces each bad byte (E6 B5, then FF) by its own U+FFFD.
                assert data == {"t": "A\ufffd\ufffdB\ufffdC"}, vector["id"]
            else:
                assert data == expected, vector["id"]
    assert not mismatches, "\n".join(map(str, mismatches))
