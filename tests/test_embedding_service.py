"""The embedding example through its real serving path: HTTP tier, Redis, spawned TF workers.

Every reference sentence must come back with cosine >= 0.9999 to sentence-transformers' vector,
one request at a time and with concurrent requests that the dispatcher batches.
"""

from __future__ import annotations

import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from testdata import embedding_reference, require_embedding_stack

require_embedding_stack()

import numpy as np  # noqa: E402

from goinfer.client import Client, GoinferError  # noqa: E402
from goinfer.queue import stream_name  # noqa: E402

from conftest import APP_ID, APP_SECRET, SM2_PRIVATE_KEY, settings_of, url_of, write_settings  # noqa: E402

PROGRAM = [sys.executable, "-m", "examples.embedding.main"]
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def reference():
    data = embedding_reference()
    return data["sentences"], np.asarray(data["embeddings"], dtype=np.float64)


@pytest.fixture
def service(tmp_path, redis_server, processes):
    settings = write_settings(
        tmp_path, redis_server.address, Models=[],
        Server={"MaxWorkers": 2, "BatchSize": 32, "BatchTimeoutMs": 20, "MessageTimeout": 60},
        Customer={"EmbeddingCache": str(tmp_path / "no-cache")},
    )
    server = processes.start("server", "0", "--yaml", str(settings), program=PROGRAM,
                             env={"GOINFER_LOG_LEVEL": "DEBUG"})
    server.wait_for_output("dispatcher for queue 0 ready", 240)
    processes.http(settings, program=PROGRAM)
    client = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SM2", sm2_private_key=SM2_PRIVATE_KEY,
                    timeout=120)
    stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    return {"client": client, "server": server, "stream": stream, "redis": redis_server.client()}


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_reference_sentences_one_at_a_time_and_batched(service, reference):
    sentences, want = reference
    client = service["client"]
    for index, sentence in enumerate(sentences):
        got = client.call("/api/embedding", {"text": sentence})["embeddings"]
        assert len(got) == 384
        assert cosine(got, want[index]) >= MIN_COSINE, (index, sentence[:40])

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda i: client.call("/api/embedding", {"text": sentences[i % len(sentences)]}),
                                range(3 * len(sentences))))
    for i, answer in enumerate(answers):
        assert cosine(answer["embeddings"], want[i % len(sentences)]) >= MIN_COSINE, i
    sizes = [int(n) for n in re.findall(r"infer_batch of Embedding: batch of (\d+)", service["server"].output)]
    assert max(sizes) > 1, "concurrent requests must have been batched"

    many = client.call("/api/embedding", {"texts": sentences[:5]})["embeddings"]
    assert len(many) == 5
    assert all(cosine(many[i], want[i]) >= MIN_COSINE for i in range(5))


def test_bad_input_is_refused_before_queueing(service):
    client = service["client"]
    client.call("/api/embedding", {"text": "one good request, so the stream exists"})
    queued_before = service["redis"].xinfo_stream(service["stream"])["entries-added"]
    cases = [({}, 1001), ({"text": 5}, 1001), ({"texts": []}, 1001), ({"texts": ["a", 1]}, 1001),
             ({"texts": ["a"] * 65}, 1002), ({"text": "é" * 5000}, 1003)]
    for data, code in cases:
        with pytest.raises(GoinferError) as refused:
            client.call("/api/embedding", data)
        assert refused.value.code == code, data
        assert refused.value.msg.startswith("api entry fail : ")
    assert service["redis"].xinfo_stream(service["stream"])["entries-added"] == queued_before
