"""Answers JSON cannot carry, with real processes: NaN, Infinity, a lone surrogate or 100,000
levels of nesting from a model are answered with the model's failure code, for that request only,
in a body that is strict JSON; the requests that travelled with it are answered normally."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from goinfer.dispatcher.runner import Runner
from goinfer.queue import Job, Reply, stream_name
from goinfer.settings import Settings
from goinfer.testing import TEST_CREDENTIALS

from conftest import settings_of, url_of, wait_until, write_settings
from sample_models import Unsendable, _unsendable

BAD_RESULTS = ("nan", "inf", "-inf", "surrogate", "deep")
MODELS = ["sample_models:Unsendable"]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def post_strict(url: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST a signed request; the HTTP status and the envelope, which must be strict JSON (RFC 8259:
    no NaN or Infinity) in valid UTF-8 (json.loads of bytes would accept neither otherwise)."""
    request = urllib.request.Request(url, data=TEST_CREDENTIALS.body(data), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw.decode("utf-8", "strict"), parse_constant=_no_constant)
    except ValueError as exc:
        return status, {"not strict JSON": f"{exc}: {raw[:200]!r}"}


def strict(text: str) -> Any:
    return json.loads(text.encode("utf-8", "strict"), parse_constant=_no_constant)


REASONS = {"nan": "it holds NaN or Infinity", "inf": "it holds NaN or Infinity", "-inf": "it holds NaN or Infinity",
           "surrogate": "it holds the lone surrogate U+DC80, which is not valid UTF-8",
           "deep": "it is nested too deeply"}


@pytest.mark.parametrize("kind", BAD_RESULTS)
def test_messages_refuse_what_strict_json_cannot_carry_with_a_value_error(kind):
    with pytest.raises(ValueError) as refused:
        Reply("r1", 0, data=_unsendable(kind)).encode()
    assert str(refused.value) == f"the result cannot be sent as JSON: {REASONS[kind]}"
    with pytest.raises(ValueError) as refused:
        Job("r1", "/api/x", _unsendable(kind), "goinfer:reply:x", 1.0).encode()
    assert str(refused.value) == f"params cannot be sent as JSON: {REASONS[kind]}"


def test_an_error_reply_always_encodes_as_strict_json():
    text = Reply("r1", 9998, "infer fail : lone \ud800 surrogate, \u00e9 kept").encode()
    assert strict(text)["msg"] == "infer fail : lone \\ud800 surrogate, \u00e9 kept"


def test_the_runner_answers_each_unsendable_result_alone(caplog):
    model = Unsendable()
    jobs = [Job(f"r{i}", model.api_path, {"kind": kind} if kind else {"i": i}, "goinfer:reply:x", 1.0)
            for i, kind in enumerate([None, *BAD_RESULTS, None])]
    texts = Runner(Settings(), {model.api_path: model}).execute_batch(model, jobs)
    assert all(isinstance(strict(text), dict) for text in texts)
    replies = [Reply.decode(text) for text in texts]
    assert [reply.code for reply in replies] == [0, *[9998] * len(BAD_RESULTS), 0]
    assert [reply.data["i"] for reply in (replies[0], replies[-1])] == [0, len(BAD_RESULTS) + 1]
    logged = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(logged) == len(BAD_RESULTS) and all("infer_batch of Unsendable (requestId r" in line for line in logged)


def test_unsendable_results_answer_infer_fail_alone_and_the_batch_is_unaffected(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS,
                              Server={"MaxWorkers": 1, "MessageTimeout": 60})
    http = processes.http(settings)
    url = url_of(settings) + "/api/unsendable"
    stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    client = redis_server.client()
    requests = [{"kind": kind} for kind in BAD_RESULTS] + [{"i": i} for i in range(10)]
    with ThreadPoolExecutor(len(requests)) as pool:
        # Queued before any worker runs, so the worker takes them all in one read: one batch.
        answers = [pool.submit(post_strict, url, data) for data in requests]
        wait_until(lambda: client.xlen(stream) == len(requests), 30, "every request to be queued")
        server = processes.server(settings)
        results = [answer.result(90) for answer in answers]

    assert [status for status, _ in results] == [200] * len(requests)
    bad, good = results[:len(BAD_RESULTS)], results[len(BAD_RESULTS):]
    assert [envelope["code"] for _, envelope in bad] == [9998] * len(BAD_RESULTS), bad
    for kind, (_, envelope) in zip(BAD_RESULTS, bad, strict=True):
        expected = f"infer fail : infer_batch: the result cannot be sent as JSON: {REASONS[kind]}"
        assert envelope["data"]["msg"] == expected
    assert [envelope["code"] for _, envelope in good] == [0] * 10, good
    assert sorted(envelope["data"]["i"] for _, envelope in good) == list(range(10))
    bad_ids = {envelope["data"]["requestId"] for _, envelope in bad}
    [batch] = {tuple(sorted(envelope["data"]["batch"])) for _, envelope in good}
    assert bad_ids <= set(batch) and len(batch) == len(requests)  # they all ran in one infer_batch call

    # One line per unsendable result on the worker, naming the model and the request; no death.
    output = server.output
    logged = re.findall(r"ERROR \S+: infer_batch of Unsendable \(requestId (\w+)\): the result cannot be sent "
                        r"as JSON: ", output)
    assert sorted(logged) == sorted(bad_ids), output
    assert "Traceback" not in output and "died" not in output
    worker_pids = {envelope["data"]["pid"] for _, envelope in good}
    status, after = post_strict(url, {"i": 99})  # the same worker serves on
    assert (status, after["code"], {after["data"]["pid"]}) == (200, 0, worker_pids)
    assert "Traceback" not in http.output


def test_a_lone_surrogate_from_api_entry_fails_that_request_only(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS, Server={"MaxWorkers": 2})
    processes.server(settings)
    http = processes.http(settings)
    url = url_of(settings) + "/api/unsendable"
    requests = [{"entry": "surrogate"} if i % 7 == 3 else {"i": i} for i in range(140)]  # 20 bad, 120 good
    start = threading.Barrier(len(requests) // 2)

    def send(data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        start.wait(30)  # half at a time, at once: many land in one enqueue pipeline
        return post_strict(url, data)

    with ThreadPoolExecutor(len(requests) // 2) as pool:
        results = list(pool.map(send, requests))

    assert [status for status, _ in results] == [200] * len(requests)
    codes = [(data.get("entry"), envelope["code"]) for data, (_, envelope) in zip(requests, results, strict=True)]
    assert codes.count(("surrogate", 9701)) == 20 and codes.count((None, 0)) == 120, codes
    for data, (_, envelope) in zip(requests, results, strict=True):
        if data.get("entry"):
            assert envelope["data"]["msg"] == ("api entry fail : params cannot be sent as JSON: it holds the lone "
                                               "surrogate U+D800, which is not valid UTF-8"), envelope
    # The HTTP tier, where api_entry ran, says which model and request failed.
    failed_ids = {envelope["data"]["requestId"] for data, (_, envelope) in zip(requests, results, strict=True)
                  if data.get("entry")}
    assert "Unsendable" in http.output and all(request_id in http.output for request_id in failed_ids)
