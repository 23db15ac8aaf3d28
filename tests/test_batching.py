"""Dynamic batching in the dispatcher, observed through real requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from goinfer.client import Client, GoinferError

from conftest import APP_ID, APP_SECRET, url_of, write_settings

MODELS = ["sample_models:Batcher", "sample_models:Recorder"]


@pytest.fixture
def api(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS,
                              Server={"MaxWorkers": 1, "BatchSize": 4, "BatchTimeoutMs": 20})
    processes.http(settings)
    processes.server(settings)
    return Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")


def outcome(api: Client, path: str, data: dict):
    try:
        return api.call(path, data)
    except GoinferError as exc:
        return exc


def test_concurrent_requests_form_batches_and_each_gets_its_own_answer(api):
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: api.call("/api/batch", {"i": i}), range(96)))
    assert [a["i"] for a in answers] == list(range(96))
    assert all(a["request_id"] == a["requestId"] for a in answers)
    sizes = [a["batch"] for a in answers]
    assert max(sizes) > 1, "concurrent requests must be batched"
    assert max(sizes) <= 8  # the model's own batch_size overrides the settings' BatchSize 4


def test_a_lone_request_waits_at_most_the_batch_timeout(api):
    assert api.call("/api/batch", {"i": 1})["batch"] == 1


def test_item_errors_fail_only_their_request(api):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: outcome(api, "/api/batch", {"i": i, "fail": i % 3 == 0}), range(24)))
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert isinstance(result, GoinferError) and result.code == 6001
            assert result.msg == f"infer fail : item {i} failed"
        else:
            assert result["i"] == i


def test_a_failing_batch_answers_each_request_with_the_error(api):
    result = outcome(api, "/api/batch", {"explode": True})
    assert isinstance(result, GoinferError)
    assert (result.code, result.msg) == (9998, "infer fail : the whole batch failed")
    result = outcome(api, "/api/batch", {"wrong-length": True})
    assert result.code == 9998 and "must return a list of" in result.msg
    # Models with only infer share the worker and are answered one by one.
    with ThreadPoolExecutor(8) as pool:
        mixed = list(pool.map(lambda i: api.call("/api/record" if i % 2 else "/api/batch", {"i": i}), range(16)))
    assert all(m["requestId"] for m in mixed)
