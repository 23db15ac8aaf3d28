"""The HTTP tier as a client sees it: every error code, the envelope, model failures on both sides."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from goinfer.client import Client, GoinferError, signed_body

from conftest import (
    APP_ID,
    APP_SECRET,
    PLAIN_APP_ID,
    PLAIN_APP_SECRET,
    SM2_PRIVATE_KEY,
    free_port,
    post_raw,
    url_of,
    write_settings,
)

ENVELOPE_KEYS = {"appId", "code", "data", "encType", "signType", "success", "timestamp"}
REQUEST_ID = re.compile(r"^\d{8}[0-9a-f]{32}$")


@pytest.fixture
def service(tmp_path, redis_server, processes):
    """One HTTP tier and one dispatcher serving Echo, Greeter and Faulty."""
    settings = write_settings(tmp_path, redis_server.address, API={"MaxBodyBytes": 4096},
                              Customer={"Greeting": "ni hao"})
    http = processes.http(settings)
    server = processes.server(settings)
    return {"settings": settings, "url": url_of(settings), "http": http, "server": server}


def client(url: str, sign_type: str = "SM2") -> Client:
    return Client(url, APP_ID, APP_SECRET, sign_type=sign_type, sm2_private_key=SM2_PRIVATE_KEY)


def body(data: dict, **overrides) -> bytes:
    fields = json.loads(signed_body(data, app_id=APP_ID, app_secret=APP_SECRET, sign_type="SHA256"))
    fields.update(overrides)
    return json.dumps(fields).encode()


def test_hello_and_success_envelope(service):
    with urllib.request.urlopen(service["url"] + "/", timeout=5) as response:
        assert response.read() == b"Hello world."
    raw = urllib.request.urlopen(urllib.request.Request(
        service["url"] + "/api/greet", method="POST",
        data=signed_body({"name": "Ada"}, app_id=APP_ID, app_secret=APP_SECRET, sign_type="SM2",
                         sm2_private_key=SM2_PRIVATE_KEY)), timeout=10)
    text = raw.read().decode()
    assert raw.headers["Content-Type"].startswith("application/json")
    assert text.startswith('{"appId":') and text.endswith("}\n")  # keys sorted as Go writes a map
    envelope = json.loads(text)
    assert set(envelope) == ENVELOPE_KEYS
    assert envelope["code"] == 0 and envelope["success"] is True
    assert envelope["appId"] == APP_ID
    assert envelope["signType"] == "plain" and envelope["encType"] == "plain"
    assert isinstance(envelope["timestamp"], int) and abs(envelope["timestamp"] - time.time()) < 60
    assert envelope["data"]["greeting"] == "ni hao, Ada"  # Customer: reaches the model
    assert envelope["data"]["msg"] == "success"
    assert REQUEST_ID.match(envelope["data"]["requestId"])


def test_sha256_sm2_and_plain_signatures(service):
    url = service["url"]
    data = client(url, "SHA256").call("/api/echo", {"n": 1.5, "s": "<&>"})
    assert (data["n"], data["s"], data["msg"]) == (1.5, "<&>", "success")
    data = client(url, "SM2").call("/api/echo", {"text": "测试测试"})
    assert data["text"] == "测试测试"
    plain = Client(url, PLAIN_APP_ID, PLAIN_APP_SECRET, sign_type="plain")
    assert plain.call("/api/echo", {"x": 1})["x"] == 1
    with pytest.raises(GoinferError) as refused:
        client(url, "plain").call("/api/echo", {"x": 1})  # not in AllowSignPlain
    assert refused.value.code == 9803


@pytest.mark.parametrize("raw, code, msg_part", [
    (b"not json", 9801, "invalid JSON"),
    (b"[]", 9801, "JSON object"),
    (None, 9800, "验签失败"),
    ("stale", 9802, "时间戳错误"),
    ("md5", 9803, "签名算法错误"),
    ("unknown-app", 9805, "AppId错误"),
    ("version-2", 9806, "版本号错误"),
    ("no-data", 9801, "data"),
])
def test_signature_errors(service, raw, code, msg_part):
    if raw is None:
        raw = body({"text": "a"}, signData="c2lnbmF0dXJl")
    elif raw == "stale":
        raw = signed_body({"a": 1}, app_id=APP_ID, app_secret=APP_SECRET, sign_type="SHA256",
                          timestamp=int(time.time()) - 301)
    elif raw == "md5":
        raw = body({"a": 1}, signType="MD5")
    elif raw == "unknown-app":
        raw = body({"a": 1}, appId="NOPE")
    elif raw == "version-2":
        raw = body({"a": 1}, version="2")
    elif raw == "no-data":
        fields = json.loads(body({"a": 1}))
        del fields["data"]
        raw = json.dumps(fields).encode()
    status, envelope = post_raw(service["url"] + "/api/echo", raw)
    assert status == 200
    assert set(envelope) == ENVELOPE_KEYS
    assert envelope["code"] == code and envelope["success"] is False
    assert set(envelope["data"]) == {"msg", "requestId"}
    assert msg_part in envelope["data"]["msg"]
    assert envelope["appId"] == "" and envelope["data"]["requestId"] == ""


def test_unknown_path_wrong_method_and_body_limit(service):
    status, envelope = post_raw(service["url"] + "/api/nothing-here", body({"a": 1}))
    assert (status, envelope["code"]) == (404, 9709)
    request = urllib.request.Request(service["url"] + "/api/echo", method="GET")
    with pytest.raises(urllib.error.HTTPError) as got:
        urllib.request.urlopen(request, timeout=5)
    assert got.value.code == 405
    assert json.loads(got.value.read())["code"] == 9711
    status, envelope = post_raw(service["url"] + "/api/echo", body({"blob": "x" * 5000}))
    assert (status, envelope["code"]) == (413, 9710)
    assert "4096" in envelope["data"]["msg"]


def test_model_errors_on_both_sides(service):
    url = service["url"]
    expectations = {
        "entry-apierror": (4321, "api entry fail : bad field x"),
        "entry-exception": (9701, "api entry fail : entry blew up"),
        "entry-not-dict": (9701, "api_entry must return a dict"),
        "entry-not-json": (9701, "not JSON serializable"),
        "infer-apierror": (5432, "infer fail : cannot infer this"),
        "infer-exception": (9998, "infer fail : infer blew up"),
        "infer-not-dict": (9998, "infer must return a dict"),
        "infer-not-json": (9998, "not JSON serializable"),
    }
    for mode, (code, msg) in expectations.items():
        with pytest.raises(GoinferError) as failed:
            client(url, "SHA256").call("/api/faulty", {"mode": mode})
        assert failed.value.code == code, mode
        assert msg in failed.value.msg, (mode, failed.value.msg)
        assert REQUEST_ID.match(failed.value.request_id)
    with pytest.raises(GoinferError) as missing:
        client(url).call("/api/greet", {})
    assert (missing.value.code, missing.value.msg) == (1001, "api entry fail : need name")
    # The service keeps running, and each side logged the traceback of its own failure.
    assert client(url).call("/api/faulty", {"mode": "fine"})["ok"] is True
    http_log, server_log = service["http"].output, service["server"].output
    assert "Traceback" in http_log and "ValueError: entry blew up" in http_log
    assert "Traceback" in server_log and "RuntimeError: infer blew up" in server_log
    assert "infer blew up" not in http_log.split("Traceback")[0]


def test_queue_timeout_when_no_dispatcher(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Server={"MessageTimeout": 1})
    processes.http(settings)
    started = time.monotonic()
    with pytest.raises(GoinferError) as timed_out:
        client(url_of(settings)).call("/api/echo", {"a": 1})
    elapsed = time.monotonic() - started
    assert timed_out.value.code == 9997
    assert 0.9 <= elapsed < 5


def test_redis_unreachable_answers_send_fail_promptly(tmp_path, processes):
    settings = write_settings(tmp_path, f"127.0.0.1:{free_port()}")
    http = processes.http(settings)
    started = time.monotonic()
    with pytest.raises(GoinferError) as failed:
        client(url_of(settings)).call("/api/echo", {"a": 1})
    assert failed.value.code == 9702
    assert time.monotonic() - started < 3
    assert http.output.count("is unreachable") == 1, http.output  # logged once, not per request


def test_no_secret_in_logs(service):
    client(service["url"]).call("/api/echo", {"a": 1})
    for proc in (service["http"], service["server"]):
        assert SM2_PRIVATE_KEY not in proc.output
        assert APP_SECRET not in proc.output


def test_async_client(service):
    import asyncio

    from goinfer.client import AsyncClient

    async def calls():
        api = AsyncClient(service["url"], APP_ID, APP_SECRET, sign_type="SM2", sm2_private_key=SM2_PRIVATE_KEY)
        try:
            answers = await asyncio.gather(*(api.acall("/api/echo", {"i": i}) for i in range(20)))
            with pytest.raises(GoinferError) as failed:
                await api.acall("/api/greet", {})
            return answers, failed.value
        finally:
            await api.aclose()

    answers, failure = asyncio.run(calls())
    assert [a["i"] for a in answers] == list(range(20))
    assert (failure.code, failure.msg) == (1001, "api entry fail : need name")
