"""The Keras all-MiniLM-L6-v2 must reproduce sentence-transformers' embeddings.

Reference: tests/data/embedding-reference/minilm-reference.json, embeddings from
sentence-transformers on the same weights. Fails (never skips) when TensorFlow, the
weights package or the reference is absent: `bash tests/run.sh` installs them.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from testdata import embedding_reference, require, require_embedding_stack

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MIN_COSINE = 0.9999


def test_import_does_not_start_tensorflow() -> None:
    """The HTTP tier and the dispatcher parent import model modules: TF must not load with them."""
    code = (
        "import sys, examples.embedding.encoder, examples.embedding.export\n"
        "loaded = sorted(m for m in ('tensorflow', 'keras', 'tokenizers') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def _needs_model() -> None:
    require_embedding_stack()


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], Any]:
    np = require("numpy")
    data = embedding_reference()
    return data["sentences"], np.asarray(data["embeddings"], dtype=np.float64)


@pytest.fixture(scope="module")
def from_weights(tmp_path_factory: pytest.TempPathFactory) -> Any:
    _needs_model()
    from examples.embedding.encoder import SentenceEncoder

    # An empty cache folder makes load() fall back to building from the weights.
    encoder = SentenceEncoder.load(cache_dir=str(tmp_path_factory.mktemp("empty-cache")))
    assert encoder.source == "weights"
    encoder.warm_up()
    return encoder


@pytest.fixture(scope="module")
def from_saved_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    _needs_model()
    from examples.embedding.encoder import SentenceEncoder
    from examples.embedding.export import export_saved_model

    out = export_saved_model(str(tmp_path_factory.mktemp("cache") / "minilm-savedmodel"))
    encoder = SentenceEncoder.load(cache_dir=out)
    assert encoder.source == out
    encoder.warm_up()
    return encoder


@pytest.fixture(params=["weights", "saved_model"])
def encoder(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(
        "from_weights" if request.param == "weights" else "from_saved_model"
    )


def _cosines(got: Any, want: Any) -> Any:
    import numpy as np

    got = np.asarray(got, dtype=np.float64)
    return (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


def _check(sentences: list[str], got: Any, want: Any) -> None:
    import numpy as np

    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosines = _cosines(got, want)
    bad = {
        ascii(sentences[i][:40]): float(cosines[i]) for i in np.flatnonzero(cosines < MIN_COSINE)
    }
    assert not bad, bad


def test_one_batch_matches_reference(encoder: Any, reference: tuple[list[str], Any]) -> None:
    sentences, want = reference
    _check(sentences, encoder.encode(sentences), want)


def test_one_at_a_time_matches_reference(encoder: Any, reference: tuple[list[str], Any]) -> None:
    import numpy as np

    sentences, want = reference
    got = np.concatenate([encoder.encode([sentence]) for sentence in sentences])
    _check(sentences, got, want)


def test_empty_list(encoder: Any) -> None:
    import numpy as np

    got = encoder.encode([])
    assert got.shape == (0, 384) and got.dtype == np.float32


def test_tokenizer_limits(reference: tuple[list[str], Any]) -> None:
    """tokenizer.json ships truncation/padding at 128; the model needs 256 and pad-to-longest."""
    _needs_model()
    from examples.embedding.encoder import (
        MAX_TOKENS,
        load_tokenizer,
        tokenize,
        weights_dir,
    )

    sentences, _ = reference
    tokenizer = load_tokenizer(weights_dir() / "tokenizer.json")
    ids, mask = tokenize(tokenizer, ["", max(sentences, key=len)])
    assert ids.shape == mask.shape == (2, MAX_TOKENS)
    assert ids[0, :3].tolist() == [101, 102, 0] and mask[0].sum() == 2  # empty text is [CLS] [SEP]
    assert ids[1, -1] == 102 and mask[1].sum() == MAX_TOKENS
