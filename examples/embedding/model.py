"""The embedding API: go-infer's showcase, serving all-MiniLM-L6-v2 with dynamic batching.

Request data `{"text": "..."}` answers `{"embeddings": [384 floats]}` (go-infer's API document
shape); `{"texts": ["...", ...]}` answers `{"embeddings": [[384 floats], ...]}`. Concurrent
requests are batched by the dispatcher, and a batch is one forward pass.

The encoder computes float32; each float is written with at most 9 significant digits, which is
enough to read back as exactly the float32 the encoder gave (`float32_digits`). Its float64
spelling would take 17 digits for no information, and every process that handles the answer
(the worker writing it, Redis, the HTTP tier reading and writing it, the client) pays for them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from goinfer import ApiError, Model

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy

log = logging.getLogger("examples.embedding")

MAX_TEXTS = 64  # texts in one request
MAX_TEXT_BYTES = 8192  # UTF-8 bytes per text; the model reads at most 256 word pieces anyway

NEED_TEXT = 1001
TOO_MANY_TEXTS = 1002
TEXT_TOO_LONG = 1003


def float32_digits(values: numpy.ndarray) -> numpy.ndarray:
    """float64 copies of float32 `values`, each the decimal of 9 significant digits nearest to
    it: 9 digits always read back as the same float32, and Python (or any JSON writer) spells
    such a float64 with those digits, not 17."""
    import numpy as np

    wide = values.astype(np.float64)
    magnitude = np.abs(wide)
    exponent = np.floor(np.log10(magnitude, where=magnitude > 0, out=np.zeros_like(wide)))
    # 10**k is exact for 0 <= k <= 22, and the quotient of two exact numbers is correctly
    # rounded: each result is the float64 nearest to its 9-digit decimal.
    scale = 10.0 ** (8 - exponent)
    digits = np.rint(wide * scale) / scale
    # Outside that range (|value| < 1e-14 or >= 1e9: a few components of a unit vector, if any)
    # the scale is inexact: those are written and read back one by one.
    flat = digits.reshape(-1)
    for index in np.flatnonzero((magnitude.reshape(-1) > 0) & ((exponent.reshape(-1) < -14)
                                                               | (exponent.reshape(-1) > 8))):
        flat[index] = float(f"{wide.flat[index]:.9g}")
    return digits


class Embedding(Model):
    """all-MiniLM-L6-v2 sentence embeddings (384 dimensions, L2-normalised)."""

    api_path = "/api/embedding"
    # api_entry only checks the texts' types and sizes (bounded by the request's own size): on the
    # event loop it costs less than the hand-off to a thread.
    api_entry_on_loop = True

    def init(self) -> None:
        from examples.embedding.encoder import SentenceEncoder

        threads = int(self.customer.get("EmbeddingThreads", 1))
        self.encoder = SentenceEncoder.load(self.customer.get("EmbeddingCache") or None,
                                            intra_op_threads=threads, inter_op_threads=1)
        self.encoder.warm_up()
        log.info("embedding model ready (%s)", self.encoder.source)

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        if "texts" in data:
            texts = data["texts"]
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise ApiError(NEED_TEXT, "texts must be a non-empty list of strings")
            if len(texts) > MAX_TEXTS:
                raise ApiError(TOO_MANY_TEXTS, f"at most {MAX_TEXTS} texts per request, got {len(texts)}")
            many = True
        else:
            text = data.get("text")
            if not isinstance(text, str):
                raise ApiError(NEED_TEXT, "need text (a string) or texts (a list of strings)")
            texts, many = [text], False
        for index, text in enumerate(texts):
            size = len(text.encode("utf-8"))
            if size > MAX_TEXT_BYTES:
                raise ApiError(TEXT_TOO_LONG, f"text {index} is {size} bytes, at most {MAX_TEXT_BYTES}")
        return {"texts": texts, "many": many}

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return self.infer_batch([(request_id, params)])[0]

    def infer_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """One forward pass for every text of every request in the batch."""
        texts = [text for _, params in batch for text in params["texts"]]
        vectors = float32_digits(self.encoder.encode(texts)).tolist()
        results, start = [], 0
        for _, params in batch:
            count = len(params["texts"])
            mine = vectors[start:start + count]
            start += count
            results.append({"embeddings": mine if params["many"] else mine[0]})
        return results
