"""The result cache and the version header, with real tiers, dispatchers and Redis."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import redis
from test_model_versions import publish

from goinfer.client import Client
from goinfer.testing import TEST_CREDENTIALS

from conftest import APP_ID, APP_SECRET, post_raw, settings_of, url_of, wait_until, write_settings

CACHED = "sample_models:CachedCounter"
VERSION_HEADER = "X-Goinfer-Model-Version"
ENVELOPE_KEYS = {"code", "appId", "signType", "encType", "success", "timestamp", "data"}


def post(url: str, api: str, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The envelope and the response headers of one signed request."""
    body = Client(url, APP_ID, APP_SECRET, sign_type="SHA256").body(data)
    request = urllib.request.Request(url + api, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read()), dict(response.headers)


def get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return json.loads(exc.read())


def metric(url: str, **labels: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(r"^goinfer_result_cache_requests_total\{" + re.escape(wanted) + r"\} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def served_revision(url: str, api: str, prefix: str = "") -> str:
    """Wait until the tier follows a revision of `api` (starting with `prefix`) and return it."""

    def known() -> str | None:
        revision = get_json(url + "/goinfer/status").get("result_cache", {}).get(api, {}).get("revision")
        return revision if revision and revision.startswith(prefix) else None

    return wait_until(known, 30, f"the tier to follow the revision of {api}")


def executions(settings: Path) -> int:
    server = settings_of(settings)["Server"]
    host, _, port = server["RedisServer"].rpartition(":")
    with redis.Redis(host=host, port=int(port)) as client:
        return int(client.llen(f"{server['QueueName']}executions"))


def cache_settings(tmp_path: Path, redis_address: str, cache: dict[str, Any], **server: Any) -> Path:
    return write_settings(tmp_path, redis_address, Models=[{"Class": CACHED, "Cache": cache}],
                          Server={"HeartbeatIntervalS": 0.5, **server})


def access_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "goinfer.access" in line]


def test_memory_level_runs_a_repeated_request_once(tmp_path, redis_server, processes):
    settings = cache_settings(tmp_path, redis_server.address, {"Size": 100})
    url = url_of(settings)
    http = processes.http(settings)
    processes.server(settings)
    served_revision(url, "/api/cached")
    nonce = uuid.uuid4().hex  # the Redis of the session is shared: no other test's answer can match

    first, first_headers = post(url, "/api/cached", {"x": 1.0, "n": nonce})
    second, second_headers = post(url, "/api/cached", {"x": 1.0, "n": nonce})
    assert first["code"] == second["code"] == 0
    assert executions(settings) == 1
    assert second["data"]["computed_by"] == first["data"]["computed_by"]
    assert second["data"]["requestId"] != first["data"]["requestId"]  # each request its own id
    assert set(second) == ENVELOPE_KEYS and set(second["data"]) == set(first["data"])
    # An unversioned model: no version header, cached or not.
    assert VERSION_HEADER not in first_headers and VERSION_HEADER not in second_headers
    access = access_lines(http.output)
    assert "cache=" not in access[-2] and access[-1].endswith("cache=memory"), access

    # cache_key rounds x: a near-equal request shares the answer.
    near, _ = post(url, "/api/cached", {"x": 1.04, "n": nonce})
    assert near["data"]["computed_by"] == first["data"]["computed_by"] and executions(settings) == 1

    # None from cache_key, an exception in it, an error answer: run every time.
    for data in ({"x": 2, "n": nonce, "nocache": True}, {"x": 3, "n": nonce, "badkey": True},
                 {"x": 4, "n": nonce, "fail": True}):
        before = executions(settings)
        answers = [post(url, "/api/cached", data)[0] for _ in range(2)]
        assert executions(settings) == before + 2, data
        if data.get("fail"):
            assert [answer["code"] for answer in answers] == [7001, 7001]
        else:
            assert answers[0]["data"]["computed_by"] != answers[1]["data"]["computed_by"]
    assert http.output.count("cache_key failed (ValueError: no key for this request)") == 1

    assert metric(url, api="/api/cached", level="memory", result="hit") == 2
    assert metric(url, api="/api/cached", level="memory", result="miss") == 3  # the first x=1 and the failing x=4 twice
    assert metric(url, api="/api/cached", level="redis", result="miss") == 0  # no TTLS: no shared level
    assert "Traceback" not in http.output


def test_shared_level_serves_the_answers_of_another_tier(tmp_path, redis_server, processes):
    (tmp_path / "b").mkdir()
    settings = cache_settings(tmp_path, redis_server.address, {"TTLS": 60})
    queue = settings_of(settings)["Server"]["QueueName"]
    other = cache_settings(tmp_path / "b", redis_server.address, {"TTLS": 60}, QueueName=queue)
    url, other_url = url_of(settings), url_of(other)
    processes.http(settings)
    second_tier = processes.http(other)
    processes.server(settings)
    revision = served_revision(url, "/api/cached")
    assert served_revision(other_url, "/api/cached") == revision
    nonce = uuid.uuid4().hex
    host, _, port = redis_server.address.rpartition(":")
    client = redis.Redis(host=host, port=int(port))
    pattern = f"goinfer:cache:/api/cached:{revision}:*"
    stored_before = len(list(client.scan_iter(match=pattern, count=1000)))

    first, _ = post(url, "/api/cached", {"x": 5, "n": nonce})
    wait_until(lambda: len(list(client.scan_iter(match=pattern, count=1000))) == stored_before + 1, 10,
               "the answer in Redis")
    ttl = max(client.ttl(key) for key in client.scan_iter(match=pattern, count=1000))
    assert 0 < ttl <= 60
    shared, _ = post(other_url, "/api/cached", {"x": 5, "n": nonce})
    assert shared["data"]["computed_by"] == first["data"]["computed_by"] and executions(settings) == 1
    assert access_lines(second_tier.output)[-1].endswith("cache=redis")
    assert metric(other_url, api="/api/cached", level="redis", result="hit") == 1
    assert metric(url, api="/api/cached", level="redis", result="miss") == 1

    # An error answer is never shared.
    post(url, "/api/cached", {"x": 6, "n": nonce, "fail": True})
    failed, _ = post(other_url, "/api/cached", {"x": 6, "n": nonce, "fail": True})
    assert failed["code"] == 7001 and executions(settings) == 3
    client.close()


def test_a_new_version_is_never_answered_from_the_old_ones_answers(tmp_path, redis_server, processes):
    base = tmp_path / "models"
    publish(base, 1, "one")
    settings = write_settings(tmp_path, redis_server.address, Server={"HeartbeatIntervalS": 0.5},
                              Models=[{"Class": "sample_models:VersionedAnswer", "ModelBasePath": str(base),
                                       "Cache": {"Size": 100, "TTLS": 60}}])
    url = url_of(settings)
    http = processes.http(settings)
    server = processes.server(settings)
    served_revision(url, "/api/versioned", "1:")
    nonce = uuid.uuid4().hex

    answers = [post(url, "/api/versioned", {"n": nonce}) for _ in range(2)]
    assert [(body["data"]["answer"], headers.get(VERSION_HEADER)) for body, headers in answers] == [("one", "1")] * 2
    assert executions(settings) == 1
    lines = access_lines(http.output)
    assert lines[-2].endswith("version=1") and lines[-1].endswith("version=1 cache=memory"), lines

    assert server.stop() == 0
    publish(base, 2, "two")
    processes.server(settings)
    served_revision(url, "/api/versioned", "2:")
    body, headers = post(url, "/api/versioned", {"n": nonce})
    assert (body["data"]["answer"], headers.get(VERSION_HEADER)) == ("two", "2")
    assert executions(settings) == 2
    assert access_lines(http.output)[-1].endswith("version=2")
    [beat] = get_json(url + "/goinfer/status")["dispatchers"]
    assert beat["served_versions"] == {"/api/versioned": "2"} and "versions /api/versioned v2" in beat["summary"]


def test_a_cached_answer_still_refuses_a_replayed_signature(tmp_path, redis_server, processes):
    settings = cache_settings(tmp_path, redis_server.address, {"Size": 100})
    settings.write_text(settings.read_text().replace("API:\n", "API:\n  RejectReplay: true\n", 1))
    url = url_of(settings)
    processes.http(settings)
    processes.server(settings)
    served_revision(url, "/api/cached")
    data = {"x": 7, "n": uuid.uuid4().hex}
    signed = TEST_CREDENTIALS.body(data, "SHA256", timestamp=int(time.time()) - 5)  # a signature of its own
    assert post_raw(url + "/api/cached", signed)[1]["code"] == 0
    fresh, _ = post(url, "/api/cached", data)  # a new signature: answered from the cache
    assert fresh["code"] == 0 and executions(settings) == 1
    assert post_raw(url + "/api/cached", signed)[1]["code"] == 9807  # replayed, though cached
