"""What the HTTP tier does to spend less CPU per request, and that none of it changes an answer.

- A model whose api_entry never blocks says so (Model.api_entry_on_loop) and is called on the
  event loop; every other model's api_entry still runs in its own threads.
- orjson writes and reads the messages and the envelope only where its result is the json
  module's (goinfer/jsoncodec.py): the same values, the same envelope bytes, the same errors.
- Log lines (one per request in the access log) spell each second's date and time once.
- A body that came whole with its headers is read without a timer; one that trickles in is
  still read whole.
- Answers are popped on a connection the reader keeps, not through redis-py's execute_command.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import re
import socket
import time
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis import asyncio as redis_asyncio
from redis.exceptions import ResponseError

from goinfer import jsoncodec
from goinfer.client import signed_body
from goinfer.http import envelope
from goinfer.logs import FORMAT, LineFormatter, setup_logging
from goinfer.models.base import Model
from goinfer.models.echo import Echo
from goinfer.queue import Job, Reply
from goinfer.reply_lists import ReplyPopper

from conftest import APP_ID, APP_SECRET, post_raw, settings_of, url_of, write_settings

# --- api_entry on the event loop ------------------------------------------------------------------


def sign(data: dict[str, Any]) -> bytes:
    return signed_body(data, app_id=APP_ID, app_secret=APP_SECRET, sign_type="SHA256")


def test_api_entry_on_loop_runs_on_the_event_loop_and_other_models_in_their_threads(
        tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address,
                              Models=["sample_models:EntryThread", "sample_models:EntryThreadOnLoop"])
    http = processes.http(settings)
    processes.server(settings)
    url = url_of(settings)
    threads = {}
    for path in ("/api/entry-thread", "/api/entry-thread-on-loop"):
        status, answer = post_raw(url + path, sign({}))
        assert status == 200 and answer["code"] == 0, answer
        threads[path] = answer["data"]["thread"]
    assert threads["/api/entry-thread-on-loop"] == "MainThread"  # the event loop's
    assert threads["/api/entry-thread"].startswith("api_entry-EntryThread-")  # its model's pool
    # SystemExit from an api_entry fails its request alone, on the loop as in a thread.
    for path in ("/api/entry-thread", "/api/entry-thread-on-loop"):
        status, answer = post_raw(url + path, sign({"exit": 1}))
        assert (status, answer["code"]) == (200, 9701), answer
        assert answer["data"]["msg"] == "api entry fail : api_entry raised SystemExit: asked to exit"
    assert post_raw(url + "/api/entry-thread-on-loop", sign({}))[1]["code"] == 0
    assert http.process.poll() is None


def test_the_built_in_echo_model_opts_in_and_the_default_is_the_pool():
    assert Echo.api_entry_on_loop is True
    assert Model.api_entry_on_loop is False


def test_api_entry_on_loop_must_be_a_bool():
    with pytest.raises(TypeError, match="api_entry_on_loop must be True or False"):
        type("Wrong", (Echo,), {"api_path": "/api/wrong", "api_entry_on_loop": 1})


# --- JSON: orjson where it gives the json module's result -------------------------------------------

# JSON values as a model or a client makes them: floats of every size (1e-7 is spelled apart by
# orjson), integers beyond 64 bits (read as floats by orjson), None, text of any code point.
json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.sampled_from([1e-7, 1.5e-5, 0.00001, 1e16, 1e21, -0.0, 2**63, 2**64, -2**63 - 1])
                | st.text())
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=20)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0 here, nor -0.0 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_loads_reads_what_json_reads(value):
    raw = json.dumps(value, ensure_ascii=False).encode()
    assert same(jsoncodec.loads(raw), json.loads(raw))


@pytest.mark.parametrize("raw", [b"[NaN]", b"[Infinity]", b'"\\ud800"', b"1e400", b"18446744073709551616",
                                 b"-9223372036854775809", b'{"a":1,"a":2}', "[1]".encode("utf-16"), b"\xef\xbb\xbf[1]",
                                 b"[1,]", b"\xff", b"[" * 100 + b"]" * 100])
def test_loads_gives_json_s_value_or_error_where_orjson_differs(raw):
    try:
        expected: Any = json.loads(raw)
    except ValueError as exc:
        with pytest.raises(type(exc)):
            jsoncodec.loads(raw)
        return
    got = jsoncodec.loads(raw)
    assert same(got, expected) or (isinstance(expected, list) and math.isnan(expected[0]) and math.isnan(got[0]))


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_dumps_reads_back_as_json_s_text_does(value):
    text = jsoncodec.dumps(value)
    assert same(json.loads(text), json.loads(json.dumps(value, ensure_ascii=False)))


def json_s_sorted_bytes(value: Any) -> bytes:
    """What dumps_sorted must give, when it gives anything."""
    return (json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
            + "\n").encode()


small_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=1e-12, max_value=1e-3).flatmap(lambda x: st.sampled_from([x, -x])),
    st.sampled_from([1e-05, -1e-05, 1.5e-05, 9.999999e-05, 1e-06, 1.5e-07, 1e-10, 5e-324, 10.00001, 100.000012,
                     1.0000123, 1e16, 1e-300]),
)
tricky_text = st.sampled_from(["0.00001", "e-5", "1e-05", " 0.0000 ", "é0.00001", "a\\", 'q"0.00001', "", "\u2028"])


small_float_values = st.recursive(
    st.one_of(small_floats, tricky_text, st.integers()),
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(tricky_text | st.text(max_size=3), inner, max_size=4)),
    max_leaves=30)


@settings(max_examples=1000, deadline=None)
@given(json_values | small_float_values)
def test_dumps_sorted_is_json_s_bytes_or_nothing(value):
    fast = jsoncodec.dumps_sorted(value)
    assert fast is None or fast == json_s_sorted_bytes(value)


def test_dumps_sorted_is_taken_for_a_usual_answer():
    body = {"code": 0, "data": {"text": "测试 <&>\u2028\n\"", "n": 3, "x": 0.25, "v": [1.5, -2.0, 1e16],
                                "ok": True}, "appId": "A"}
    assert jsoncodec.dumps_sorted(body) == json_s_sorted_bytes(body)


def test_dumps_sorted_is_taken_for_small_floats():
    """An embedding's answer holds a component under 1e-04 about one time in two: orjson spells
    it otherwise than the json module, and the respelled bytes, not the json module's slower
    encoder, are what goes out."""
    body = {"code": 0, "data": {"embedding": [0.0123, -1.5e-05, 1e-05, 2.5e-07, -3e-09, 10.00001, 1e-100, 0.5],
                                "msg": "it is 1e-7 and 0.00001, in words"}}
    fast = jsoncodec.dumps_sorted(body)
    assert fast == json_s_sorted_bytes(body)
    assert fast is not None and b"-1.5e-05,1e-05,2.5e-07,-3e-09,10.00001,1e-100" in fast
    # A string holding a quote leaves the whole answer to the json module.
    assert jsoncodec.dumps_sorted({"x": 1e-7, "s": 'a"b'}) is None


@pytest.mark.parametrize("data", [{"x": 1e-7}, {"x": None}, {"x": 2**64}, {"x": [[[]]] * 3, "y": 0.00001},
                                  {"big": 10**30, "small": 5e-324}])
def test_the_envelope_is_json_s_bytes(data):
    body = envelope.success("A1", "20260101" + "0" * 32, data).body
    assert isinstance(body, bytes)
    parsed = json.loads(body)
    expected = dict(parsed, data={**data, "msg": "success", "requestId": "20260101" + "0" * 32})
    assert body == json_s_sorted_bytes(expected)


REQUEST_ID = "20260101" + "0" * 32


def keys_sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: keys_sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [keys_sorted(item) for item in value]
    return value


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=8) | st.sampled_from(["msg", "requestId", "answer", "data"]),
                       json_values | small_float_values, max_size=5))
def test_a_success_travels_as_the_answer_the_tier_sends(data):
    """A worker writes a success's data as the HTTP tier's envelope holds it; the tier copies it
    unread into go-infer's bytes, and every other reader still gets the model's data."""
    encoded = Reply(REQUEST_ID, 0, data=data, queued_ms=1.5, revision="Echo").encode()
    kept = Reply.decode(encoded.encode(), keep_answer=True)
    full = Reply.decode(encoded)
    # What the json module carries, keys sorted as in every answer.
    expected_data = keys_sorted(json.loads(json.dumps(data, ensure_ascii=False)))
    assert same(keys_sorted(full.data), expected_data) and same(keys_sorted(kept.plain_data()), expected_data)
    assert (kept.id, kept.code, kept.queued_ms, kept.revision) == (REQUEST_ID, 0, 1.5, "Echo")
    if kept.answer is None:  # the model's own msg or requestId, or what orjson may spell otherwise
        assert kept.data is not None and ("msg" in data or "requestId" in data or jsoncodec.dumps_sorted(
            {**data, "msg": "success", "requestId": REQUEST_ID}) is None)
        return
    assert kept.data is None
    body = envelope.answered("A1", kept.answer).body
    assert isinstance(body, bytes)
    envelope_fields = json.loads(body)
    assert body == json_s_sorted_bytes(dict(envelope_fields, data={**data, "msg": "success",
                                                                    "requestId": REQUEST_ID}))
    assert body == json_s_sorted_bytes(dict(envelope_fields, data=json.loads(envelope.success(
        "A1", REQUEST_ID, data).body)["data"]))


def test_a_reply_written_the_older_way_reads_as_before():
    """Older workers put data first and as the model gave it; a data that itself holds the
    answer's mark is still read as data."""
    for raw in ({"id": "r1", "code": 0, "data": {"x": 1, "answer": 1, "data": {"y": 2}}, "queued_ms": 1.0},
                {"id": "r1", "code": 0, "queued_ms": 1.0, "data": {"x": 1, "answer": 1, "data": {"y": 2}}}):
        text = json.dumps(raw, separators=(",", ":"))
        for keep in (False, True):
            reply = Reply.decode(text, keep_answer=keep)
            assert (reply.answer, reply.data, reply.queued_ms) == (None, raw["data"], 1.0)


def test_messages_refuse_what_they_refused():
    for bad, reason in (({"x": float("nan")}, "it holds NaN or Infinity"),
                        ({"x": "\ud800"}, "it holds the lone surrogate U+D800, which is not valid UTF-8"),
                        ({"x": object()}, "Object of type object is not JSON serializable")):
        with pytest.raises(ValueError, match=re.escape(f"params cannot be sent as JSON: {reason}")):
            Job("r1", "/api/x", bad, "goinfer:reply:x", 1.0).encode()
        with pytest.raises(ValueError, match=re.escape(f"the result cannot be sent as JSON: {reason}")):
            Reply("r1", 0, data=bad).encode()


class Colour(enum.Enum):
    RED = "red"


def test_uuids_and_enums_travel_as_their_value_whichever_encoder_writes_them():
    """orjson writes them itself; the json module (taken when a message holds null) is told to
    write them the same way, so a message never depends on which one wrote it."""
    key = uuid.UUID(int=7)
    for params in ({"id": key, "colour": Colour.RED}, {"id": key, "colour": Colour.RED, "none": None}):
        decoded = Job.decode(Job("r1", "/api/x", params, "goinfer:reply:x", 1.0).encode())
        assert decoded.params["id"] == str(key) and decoded.params["colour"] == "red"


def test_replies_keep_integers_beyond_64_bits_exact():
    data = {"big": 2**64 + 1, "neg": -2**63 - 1, "n": 12345678901234567890123}
    assert Reply.decode(Reply("r1", 0, data=data).encode().encode()).data == data


# --- the log's format ------------------------------------------------------------------------------


def test_log_lines_are_the_formatter_s_byte_for_byte():
    """LineFormatter spells each second's date and time once; the lines stay logging's own."""
    ours, theirs = LineFormatter(FORMAT), logging.Formatter(FORMAT)
    start = time.time()
    for step in range(5000):  # across many second boundaries, every millisecond value
        record = logging.LogRecord("goinfer.access", logging.INFO, __file__, 1, "POST %s code=%d", ("/api/echo", 0),
                                   None)
        record.created = start + step * 0.0173
        record.msecs = (record.created - int(record.created)) * 1000
        assert ours.format(record) == theirs.format(record)


def test_the_goinfer_handler_uses_it():
    setup_logging()
    [handler] = [h for h in logging.getLogger().handlers if getattr(h, "_goinfer", False)]
    assert isinstance(handler.formatter, LineFormatter)


# --- reading the body -----------------------------------------------------------------------------


def test_a_body_that_trickles_in_after_its_headers_is_read_whole(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address)
    processes.http(settings)
    processes.server(settings)
    body = sign({"text": "x" * 3000})
    port = settings_of(settings)["API"]["Port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:100])
        time.sleep(0.3)
        conn.sendall(body[100:])
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    envelope_ = json.loads(payload)
    assert envelope_["code"] == 0 and envelope_["data"]["text"] == "x" * 3000


def test_replies_are_read_without_blmpop_on_a_redis_that_has_none(tmp_path, processes) -> None:
    """Replies come back with one BLMPOP per wake-up (Redis 7); a Redis without it (older, or
    with the command renamed away, as here) is read with BLPOP and LPOP instead."""
    import shutil
    import subprocess

    from goinfer.testing import free_port, wait_until

    port = free_port()
    redis_server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                                     "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                     "--rename-command", "BLMPOP", ""], stdout=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        wait_until(lambda: _pings(client), 20, "redis-server to answer")
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command("BLMPOP", 0.01, 1, "k", "LEFT")
        settings = write_settings(tmp_path, f"127.0.0.1:{port}", Models=["goinfer.models.echo:Echo"])
        processes.server(settings)
        processes.http(settings)
        url = url_of(settings) + "/api/echo"
        for i in range(20):
            body = signed_body({"text": f"t{i}", "image": ""}, app_id=APP_ID, app_secret=APP_SECRET, sign_type="SHA256")
            status, answer = post_raw(url, body, timeout=30)
            assert status == 200 and answer["code"] == 0 and answer["data"]["text"] == f"t{i}", answer
    finally:
        redis_server.terminate()
        redis_server.wait(10)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


class _CountingRedis(redis_asyncio.Redis):
    """A real client that counts the commands sent through redis-py's execute_command."""

    executed: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.executed.append(str(args[0]))
        return await super().execute_command(*args, **options)


def test_reply_lists_are_popped_on_a_kept_connection_and_a_cancelled_pop_takes_nothing(redis_server) -> None:
    """The HTTP tier's reader pops answers with raw BLMPOPs on a connection it keeps (redis-py's
    execute_command cost ~14 % of the process when answers come one at a time). A pop cancelled
    while it waits (the tier stopping) must leave its connection closed, so that no answer is
    taken by a BLMPOP nobody reads any more."""
    async def scenario() -> None:
        client = _CountingRedis(host="127.0.0.1", port=redis_server.port)
        client.executed = []
        popper = ReplyPopper()
        key = f"test:replies:{uuid.uuid4().hex}"
        try:
            await client.rpush(key, b"a", b"b")
            assert await popper.pop(client, [key], 1, 10) == [b"a", b"b"]
            for i in range(3):
                await client.rpush(key, f"r{i}")
                assert await popper.pop(client, [key], 1, 10) == [f"r{i}".encode()]
            assert "BLMPOP" not in client.executed  # the kept connection, not execute_command
            waiting = asyncio.ensure_future(popper.pop(client, [key], 30, 10))
            await asyncio.sleep(0.2)  # blocked in Redis by now
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            for _ in range(100):  # Redis has dropped the cancelled BLMPOP's connection
                if "cmd=blmpop" not in (await client.execute_command("CLIENT", "LIST")).decode():
                    break
                await asyncio.sleep(0.02)
            await client.rpush(key, b"after")
            assert await popper.pop(client, [key], 1, 10) == [b"after"]
            assert await popper.pop(client, [key], 0.1, 10) == []
        finally:
            await client.delete(key)
            await client.aclose()

    asyncio.run(scenario())


def test_a_reply_pop_redis_refuses_gives_its_connection_back(redis_server) -> None:
    """A refused BLMPOP (here WRONGTYPE; after a failover, READONLY or UNBLOCKED) gives the reader's
    connection back to the pool open, where the tier's closing of idle connections reaches it,
    rather than keep it on a server that may no longer be the master."""
    async def scenario() -> None:
        client = redis_asyncio.Redis(host="127.0.0.1", port=redis_server.port)
        pool = client.connection_pool
        popper = ReplyPopper()
        key = f"test:replies:{uuid.uuid4().hex}"
        try:
            await client.set(key, "not a list")
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await popper.pop(client, [key], 0.1, 10)
            assert len(pool._in_use_connections) == 0 and len(pool._available_connections) == 1
            await client.delete(key)
            await client.rpush(key, b"a")
            assert await popper.pop(client, [key], 1, 10) == [b"a"]
        finally:
            await client.delete(key)
            await client.aclose()

    asyncio.run(scenario())
