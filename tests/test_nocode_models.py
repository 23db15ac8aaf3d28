"""Model files served from the settings alone: a SavedModel and a `.keras` file, no class written.

The models are built and exported here, and the answers that come back through the HTTP tier,
Redis and a spawned worker must equal the models' own `predict` (and, for the embedding example's
SavedModel, sentence-transformers' reference vectors). One dispatcher with one worker serves all
of them, so TensorFlow is imported once in a worker and once here.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from goinfer.client import Client, GoinferError
from goinfer.queue import stream_name

from conftest import APP_ID, APP_SECRET, ProcessFactory, settings_of, url_of, write_settings
from testdata import embedding_reference, require_embedding_stack

require_embedding_stack()

import numpy as np  # noqa: E402

SAVED = "goinfer.models.tensorflow:SavedModel"
KERAS = "goinfer.models.tensorflow:KerasModel"
TINY_INPUTS = {"x": {"Tensor": "x", "DType": "float32", "Shape": [4]}}
TOKENS = {"DType": "int32", "Shape": [None], "Pad": 0}  # a sequence of any length, padded in a batch
MIN_COSINE = 0.9999


def tiny_entries(base: Path) -> list[dict]:
    return [
        {"Class": SAVED, "ApiPath": "/api/tiny", "ModelBasePath": str(base / "saved"), "Signature": "serving_default",
         "Inputs": TINY_INPUTS, "Outputs": {"y": "output_0"}, "BatchSize": 32, "Warmup": [{"x": [0, 0, 0, 0]}]},
        {"Class": KERAS, "ApiPath": "/api/tiny-keras", "ModelBasePath": str(base / "keras"),
         "Inputs": TINY_INPUTS, "Outputs": ["y"]},
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A seeded few-Dense-layer Keras model, written as a SavedModel and as a .keras file in version
    folders 1, and the embedding example's encoder exported by its own export.py."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    base = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(1234)
    x = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(16, activation="relu")(x)
    hidden = keras.layers.Dense(8, activation="tanh")(hidden)
    model = keras.Model(x, keras.layers.Dense(3, name="y")(hidden))
    model.export(str(base / "saved" / "1"), verbose=False)
    (base / "keras" / "1").mkdir(parents=True)
    model.save(str(base / "keras" / "1" / "model.keras"))

    from examples.embedding.export import export_saved_model

    export_saved_model(str(base / "embedding" / "1"))
    return base, model


@pytest.fixture(scope="module")
def service(exported, redis_server, tmp_path_factory):
    base, _ = exported
    folder = tmp_path_factory.mktemp("service")
    processes = ProcessFactory(folder)
    embedding = {"Class": SAVED, "ApiPath": "/api/embed", "ModelBasePath": str(base / "embedding"),
                 "Inputs": {"input_ids": TOKENS, "attention_mask": TOKENS}, "Outputs": {"embedding": "output_0"}}
    settings = write_settings(folder, redis_server.address, Models=[*tiny_entries(base), embedding],
                              Server={"MaxWorkers": 1, "BatchSize": 32, "BatchTimeoutMs": 40, "MessageTimeout": 60})
    try:
        server = processes.server(settings, wait=False, env={"GOINFER_LOG_LEVEL": "DEBUG"})
        server.wait_for_output("dispatcher for queue 0 ready", 240)
        processes.http(settings)
        yield {"client": Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=120),
               "server": server}
    finally:
        processes.cleanup()


def batch_sizes(output: str, api: str) -> list[int]:
    return [int(n) for n, _ in batches(output, api)]


def batches(output: str, api: str) -> list[tuple[int, int]]:
    """(requests, model calls) of every batch the worker ran for `api`."""
    return [(int(n), int(calls)) for n, calls in
            re.findall(rf"{re.escape(api)}: batch of (\d+) requests in (\d+) calls", output)]


@pytest.mark.parametrize("api", ["/api/tiny", "/api/tiny-keras"])
def test_answers_equal_the_keras_models_own_predict_one_by_one_and_batched(service, exported, api):
    _, model = exported
    inputs = np.random.default_rng(7).normal(size=(48, 4)).astype(np.float32)
    want = model.predict(inputs, verbose=0)
    client = service["client"]
    for i in range(4):
        answer = client.call(api, {"x": inputs[i].tolist()})
        assert np.allclose(answer["y"], want[i], rtol=1e-5, atol=1e-6), (i, answer["y"], want[i])

    before = len(batch_sizes(service["server"].output, api))
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: client.call(api, {"x": inputs[i].tolist()}), range(4, len(inputs))))
    got = np.asarray([answer["y"] for answer in answers], dtype=np.float32)
    assert np.allclose(got, want[4:], rtol=1e-5, atol=1e-6)
    sizes = batch_sizes(service["server"].output, api)[before:]
    assert sizes and max(sizes) > 1, f"concurrent requests must have been batched: {sizes}"


def test_the_embedding_examples_saved_model_served_from_settings_only(service, exported):
    """The example's SavedModel takes token ids and an attention mask, not text (TensorFlow cannot
    run the WordPiece tokenizer), so the client tokenizes with the example's tokenizer and sends ids.
    Sentences of different lengths share a batch: `Pad: 0` pads ids and mask, and the mask keeps
    the padding out of the mean, so every answer still equals the reference vector."""
    from examples.embedding.encoder import MAX_TOKENS, SentenceEncoder, load_tokenizer, tokenize

    base, _ = exported
    reference = embedding_reference()
    sentences = reference["sentences"]
    want = np.asarray(reference["embeddings"], dtype=np.float64)
    folder = base / "embedding" / "1"
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    own = SentenceEncoder.from_saved_model(folder).encode(sentences)

    def request(index: int) -> dict:
        ids, mask = tokenize(tokenizer, [sentences[index]])
        assert ids.shape[1] <= MAX_TOKENS
        return {"input_ids": ids[0].tolist(), "attention_mask": mask[0].tolist()}

    client = service["client"]
    before = len(batch_sizes(service["server"].output, "/api/embed"))
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: client.call("/api/embed", request(i))["embedding"], range(len(sentences))))
    got = np.asarray(answers, dtype=np.float64)
    cosines = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosines.min() >= MIN_COSINE, [(i, c) for i, c in enumerate(cosines) if c < MIN_COSINE]
    assert np.allclose(got, own, atol=2e-6), np.abs(got - own).max()
    ran = batches(service["server"].output, "/api/embed")[before:]
    assert any(n > 1 and calls == 1 for n, calls in ran), f"sentences of different lengths must share a call: {ran}"


def test_bad_input_is_refused_with_a_clear_message_before_anything_is_queued(tmp_path, redis_server, processes):
    """No dispatcher runs: every answer comes from the HTTP tier's checks alone, and that tier
    never loads TensorFlow."""
    models = tmp_path / "models"  # the HTTP tier reads only the settings, never the files
    broken = {"Class": SAVED, "ApiPath": "/api/broken", "ModelBasePath": str(models / "saved"),
              "Inputs": {"x": {"DType": "float", "Shape": [4]}}}
    grid = {"Class": SAVED, "ApiPath": "/api/grid", "ModelBasePath": str(models / "saved"),
            "Inputs": {"m": {"DType": "int32", "Shape": [None, 2]}, "flag": {"DType": "bool", "Shape": []}}}
    settings = write_settings(tmp_path, redis_server.address, Models=[*tiny_entries(models), broken, grid])
    http = processes.http(settings)
    client = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=30)

    cases = [
        ("/api/tiny", {}, 1101, "missing input 'x' (float32, shape [4])"),
        ("/api/tiny", {"x": [1, 2, 3, 4], "X": 1}, 1102, "unknown field 'X' (the inputs are: x)"),
        ("/api/tiny", {"x": [1, 2, "3", 4]}, 1103, "input x[2] must be a float32 number, got a string"),
        ("/api/tiny", {"x": [1, 2, True, 4]}, 1103, "input x[2] must be a float32 number, got true"),
        ("/api/tiny", {"x": [1, 2, 3]}, 1104, "input x must have shape [4]: x has 3 values, expected 4"),
        ("/api/tiny", {"x": [[1, 2], 3, 4, 5]}, 1104,
         "input x must have shape [4]: x[0] is a list, expected one float32 value"),
        ("/api/tiny-keras", {"x": 5}, 1104, "input x must have shape [4]: x is the number 5, expected a list"),
        ("/api/grid", {"m": [[1, 2], [3, 4.5]], "flag": True}, 1103,
         "input m[1][1] must be a whole int32 number, got 4.5"),
        ("/api/grid", {"m": [[1, 2], [3, 2**31]], "flag": True}, 1103,
         f"input m[1][1] must be within the int32 range [{-2**31}, {2**31 - 1}], got {2**31}"),
        ("/api/grid", {"m": [[1, 2], [3]], "flag": False}, 1104,
         "input m must have shape [None, 2]: m[1] has 1 values, expected 2"),
        ("/api/grid", {"m": [[1, 2], [3, 4]], "flag": 1}, 1103, "input flag must be true or false, got the number 1"),
    ]
    for api, data, code, message in cases:
        with pytest.raises(GoinferError) as refused:
            client.call(api, data)
        assert (refused.value.code, refused.value.msg) == (code, f"api entry fail : {message}"), data

    ragged = {"Class": SAVED, "ApiPath": "/api/ragged", "ModelBasePath": str(models / "r"),
              "Inputs": {"ids": {"DType": "int64", "Shape": [None, None]}}}
    (tmp_path / "two").mkdir()
    settings_two = write_settings(tmp_path / "two", redis_server.address, Models=[ragged])
    http_two = processes.http(settings_two)
    with pytest.raises(GoinferError) as refused:
        Client(url_of(settings_two), APP_ID, APP_SECRET, sign_type="SHA256").call(
            "/api/ragged", {"ids": [[1, 2, 3], [4, 5, 6], [7, 8]]})
    assert (refused.value.code, refused.value.msg) == (
        1104, "api entry fail : input ids is ragged: ids[2] has 2 values and ids[0] has 3")

    with pytest.raises(GoinferError) as refused:
        client.call("/api/broken", {"x": [1, 2, 3, 4]})
    assert refused.value.code == 9701
    assert refused.value.msg.startswith("api entry fail : model settings of /api/broken: Inputs: x: DType must be "
                                        "one of float16, float32, float64, int8"), refused.value.msg

    redis = redis_server.client()
    for path in (settings, settings_two):
        queue = settings_of(path)["Server"]["QueueName"]
        assert redis.xlen(stream_name(queue, 0)) == 0, "a refused request must not be queued"
    for proc in (http, http_two):
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "tensorflow" not in maps and "numpy" not in maps, "the HTTP tier must not load TensorFlow or numpy"
    assert "Traceback" not in http.output


def test_a_settings_entry_that_does_not_match_the_model_stops_the_dispatcher_with_one_line(
        tmp_path, redis_server, processes, exported):
    base, _ = exported
    wrong = {"Class": SAVED, "ApiPath": "/api/tiny", "ModelBasePath": str(base / "saved"),
             "Inputs": {"x": {"Tensor": "x", "DType": "float32", "Shape": [3]}}}
    settings = write_settings(tmp_path, redis_server.address, Models=[wrong], Server={"MaxWorkers": 1})
    server = processes.server(settings, wait=False)
    assert server.process.wait(240) == 1
    assert ("SavedModel /api/tiny: Inputs: x: Shape [3], but the model's x takes [4] per example"
            in server.output), server.output
