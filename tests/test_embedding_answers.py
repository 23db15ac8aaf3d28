"""The embedding example's answers: exactly the encoder's float32 values, in at most 9 digits each.

A float32 written with its float64 spelling takes 17 significant digits; 9 always read back as
the same float32. Checked on the real encoder's output for the reference sentences, and on
float32 values of every magnitude.
"""

from __future__ import annotations

from typing import Any

import pytest

from testdata import embedding_reference, require_embedding_stack

require_embedding_stack()

import numpy as np  # noqa: E402

from examples.embedding.model import Embedding, float32_digits  # noqa: E402


def significant_digits(value: float) -> int:
    mantissa = repr(value).lstrip("-").split("e")[0]
    return len(mantissa.replace(".", "").lstrip("0").rstrip("0")) if mantissa.strip("0.") else 1


@pytest.fixture(scope="module")
def model() -> Any:
    from examples.embedding.encoder import SentenceEncoder

    embedding = Embedding()
    embedding.encoder = SentenceEncoder.from_weights()
    return embedding


def test_answers_are_the_encoders_float32_values_in_at_most_9_digits(model: Any) -> None:
    sentences = embedding_reference()["sentences"]
    want = model.encoder.encode(sentences)
    batch = [(f"r{i}", model.api_entry({"text": text})) for i, text in enumerate(sentences)]
    answers = model.infer_batch(batch)
    got = np.asarray([answer["embeddings"] for answer in answers])
    assert got.shape == (len(sentences), 384)
    assert (got.astype(np.float32) == want).all(), "every value reads back as the encoder's float32"
    assert max(significant_digits(value) for row in got.tolist() for value in row) <= 9
    # The same texts in another batch (padded otherwise) may differ in the last float32 bit.
    many = model.infer_batch([("m", model.api_entry({"texts": sentences[:3]}))])[0]["embeddings"]
    assert (np.asarray(many, dtype=np.float32) == model.encoder.encode(sentences[:3])).all()


def test_every_float32_reads_back_the_same() -> None:
    rng = np.random.default_rng(7)
    values = rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([values[np.isfinite(values)],
                             np.array([0.0, -0.0, 1.0, -1.0, 0.1, 1e-14, 3.4028235e38, 1e-45], np.float32)])
    written = float32_digits(values)
    assert (written.astype(np.float32) == values).all()
    assert max(significant_digits(value) for value in written[::10].tolist()) <= 9


def test_the_spelling_has_9_digits() -> None:
    vector = np.float32([0.006385671440511942, -0.1, 1 / 3, 1.5e-33, -2.5e20])
    assert str(float32_digits(vector).tolist()) == "[0.00638567144, -0.100000001, 0.333333343, 1.50000004e-33, " \
        "-2.50000005e+20]"
