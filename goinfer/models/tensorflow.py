"""Serve a TensorFlow SavedModel or a Keras `.keras` file from the settings alone, without a class.

    Models:
      - Class: goinfer.models.tensorflow:SavedModel
        ApiPath: /api/tiny
        ModelBasePath: /srv/models/tiny       # <base>/<version>/ holds a SavedModel
        Signature: serving_default
        Inputs:                               # request field -> input tensor
          x: {Tensor: x, DType: float32, Shape: [4]}   # shape of one example: the batch is implied
        Outputs: [output_0]                   # or {answer_field: output_name}; default: all
        BatchSize: 32                         # optional: this model's dynamic batch size

`KerasModel` is the same for `<base>/<version>/model.keras` (`File:` names another file), with
the answers of `model.predict`. Both are ordinary Models: versions, reload, `Warmup:` and the
result cache apply as to any other.

TensorFlow is imported in `init`, in workers only: the HTTP tier imports this module to check
requests (goinfer.models.tensor_inputs, plain Python) and must stay free of it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import Any

from goinfer.errors import ApiError
from goinfer.models.base import Model
from goinfer.models.tensor_inputs import InputChecker, ModelSettingsError, TensorInput, parse_inputs, parse_outputs
from goinfer.models.versions import VersionError, choose_version

log = logging.getLogger("goinfer.models.tensorflow")

_OPTION_KEYS = ("Inputs", "Outputs", "BatchSize", "BatchTimeoutMs", "Threads")


class _FilesModel(Model):
    """What both file formats share: settings, request checks, batching and answers.

    Each call of the model gets the requests of a batch whose inputs can be stacked: all of them
    when every input of any size declares `Pad`, else those of equal shapes (one call per shape).
    Answers are plain lists, one row of each output per request.
    """

    _extra_keys: tuple[str, ...] = ()
    _checker: InputChecker | None = None

    # --- settings ---------------------------------------------------------------------------

    def _options(self) -> Mapping[str, Any]:
        if self.config is None:
            raise ModelSettingsError(f"{type(self).__name__} is configured in the settings: list it under Models: as "
                                     "a mapping with Class, ApiPath, ModelBasePath and Inputs")
        options = self.config.options
        unknown = sorted(set(map(str, options)) - set(_OPTION_KEYS) - set(self._extra_keys))
        if unknown:
            raise ModelSettingsError(f"unknown key {unknown[0]!r} (keys: "
                                     f"{', '.join((*_OPTION_KEYS, *self._extra_keys))})")
        return options

    def _input_checker(self) -> InputChecker:
        """Parsed once per instance: the HTTP tier checks every request with it."""
        checker = self._checker
        if checker is None:
            checker = self._checker = InputChecker(parse_inputs(self._options().get("Inputs")))
        return checker

    def _where(self) -> str:
        return f"{type(self).__name__} {getattr(self, 'api_path', '?')}"

    def _folder(self) -> str:
        """The version folder to load: the dispatcher's choice, else the newest (or pinned) one."""
        if self.version_path is not None:
            return self.version_path
        if self.config is None or self.config.base_path is None:
            raise ModelSettingsError("ModelBasePath is not set: it names the folder of the version folders")
        try:
            served = choose_version(self.config.base_path, self.config.version)
        except VersionError as exc:
            raise ModelSettingsError(str(exc)) from None
        self.version = served.number
        return served.path

    def _configure(self) -> tuple[tuple[TensorInput, ...], tuple[tuple[str, str], ...] | None]:
        options = self._options()
        checker = self._input_checker()
        outputs = parse_outputs(options.get("Outputs"))
        for key in ("BatchSize", "BatchTimeoutMs"):
            value = options.get(key)
            if value is None:
                continue
            whole = key == "BatchSize"
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                    or value < (1 if whole else 0):
                raise ModelSettingsError(f"{key} must be a {'positive whole' if whole else 'non-negative'} "
                                         f"number, got {value!r}")
            # Read by the worker's batching after init; per instance, as each entry has its own.
            setattr(self, "batch_size" if key == "BatchSize" else "batch_timeout_ms", value)
        threads = options.get("Threads")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ModelSettingsError(f"Threads must be a positive whole number, got {threads!r}")
            tf = _import("tensorflow")
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                log.warning("%s: TensorFlow already started, Threads: %d not applied", self._where(), threads)
        return checker.inputs, outputs

    # --- hooks --------------------------------------------------------------------------------

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        try:
            checker = self._input_checker()
        except ModelSettingsError as exc:
            code = self.settings.error("ApiEntryFail").code if self.settings is not None else 9701
            raise ApiError(code, f"model settings of {getattr(self, 'api_path', '?')}: {exc}") from None
        return checker.check(data)

    def init(self) -> None:
        try:
            self._inputs, self._outputs = self._configure()
            folder = self._folder()
            self._load(folder)
        except ModelSettingsError as exc:
            raise ModelSettingsError(f"{self._where()}: {exc}") from None
        log.info("%s: serving %s", self._where(), folder)

    def warmup(self) -> None:
        """Check `Warmup:` params as requests are checked, so a bad sample says which and why."""
        samples = (*self.warmup_params, *(self.config.warmup if self.config else ()))
        for index, params in enumerate(samples):
            try:
                self._input_checker().check(params)
            except ApiError as exc:
                raise ModelSettingsError(f"{self._where()}: Warmup[{index}]: {exc.msg}") from None
        super().warmup()

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        result = self.infer_batch([(request_id, params)])[0]
        if isinstance(result, ApiError):
            raise result
        return result

    def infer_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any] | ApiError]:
        import numpy as np

        arrays = [{spec.field: np.asarray(params[spec.field], dtype=_numpy_dtype(spec.dtype)) for spec in self._inputs}
                  for _, params in batch]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, row in enumerate(arrays):
            key = tuple(row[spec.field].shape for spec in self._inputs if spec.pad is None)
            groups.setdefault(key, []).append(index)
        results: list[Any] = [None] * len(batch)
        for members in groups.values():
            stacked = {spec.tensor: _stack([arrays[i][spec.field] for i in members], spec.pad) for spec in self._inputs}
            try:
                outputs = self._call(stacked)
            except Exception as exc:  # one group's failure fails only its requests
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                log.warning("%s: a call for %d requests failed: %s: %s", self._where(), len(members),
                            type(exc).__name__, first)
                failed = ApiError(self.settings.error("InferFail").code if self.settings is not None else 9998,
                                  f"{type(exc).__name__}: {first}")
                for i in members:
                    results[i] = failed
                continue
            for position, i in enumerate(members):
                results[i] = {field: _plain(outputs[name][position]) for field, name in self._answer_fields(outputs)}
        log.debug("%s: batch of %d requests in %d calls", self._where(), len(batch), len(groups))
        return results

    def _answer_fields(self, outputs: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        return self._outputs if self._outputs is not None else tuple((name, name) for name in sorted(outputs))

    # --- what each format provides ------------------------------------------------------------

    def _load(self, folder: str) -> None:
        raise NotImplementedError

    def _call(self, inputs: dict[str, Any]) -> Mapping[str, Any]:
        """Run the model on stacked inputs (by tensor name); numpy arrays by output name."""
        raise NotImplementedError


class SavedModel(_FilesModel):
    """A TensorFlow SavedModel's signature, served from `<ModelBasePath>/<version>/`.

    `Signature:` names the signature (default serving_default). Its inputs must all be mapped by
    `Inputs:` with the signature's dtypes and compatible shapes, and `Outputs:` must name its
    outputs: this is checked when the worker loads the model, so a mistake stops the dispatcher
    with one line instead of failing every request.
    """

    _extra_keys = ("Signature",)

    def _load(self, folder: str) -> None:
        tf = _import("tensorflow")
        name = self.config.options.get("Signature", "serving_default") if self.config else "serving_default"
        try:
            loaded = tf.saved_model.load(folder)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelSettingsError(f"cannot load a SavedModel from {folder}: {first}") from None
        signatures = getattr(loaded, "signatures", {})
        if name not in signatures:
            raise ModelSettingsError(f"the SavedModel in {folder} has no signature {name!r} "
                                     f"(it has: {', '.join(sorted(signatures)) or 'none'})")
        function = signatures[name]
        expected: dict[str, Any] = function.structured_input_signature[1]
        for spec in self._inputs:
            tensor = expected.get(spec.tensor)
            if tensor is None:
                raise ModelSettingsError(f"Inputs: {spec.field}: signature {name!r} has no input {spec.tensor!r} "
                                         f"(its inputs: {', '.join(sorted(expected))})")
            _check_tensor(spec, tensor.dtype.name, tensor.shape.as_list() if tensor.shape.rank is not None else None)
        unmapped = sorted(set(expected) - {spec.tensor for spec in self._inputs})
        if unmapped:
            raise ModelSettingsError(f"signature {name!r} also takes {', '.join(unmapped)}: map them under Inputs")
        _check_outputs(self._outputs, list(function.structured_outputs))
        self._loaded = loaded  # the function alone does not keep the variables alive
        self._function = function

    def _call(self, inputs: dict[str, Any]) -> Mapping[str, Any]:
        tf = _import("tensorflow")
        outputs = self._function(**{name: tf.constant(value) for name, value in inputs.items()})
        return {name: tensor.numpy() for name, tensor in outputs.items()}


class KerasModel(_FilesModel):
    """A Keras model saved with `model.save(".../model.keras")`, served from `<base>/<version>/`.

    `File:` names the file in the version folder (default model.keras). Inputs map to the model's
    input names; outputs are named after the layers that produce them (`model.output_names`), or
    the keys of a model that returns a mapping. Answers are those of `model.predict`.
    """

    _extra_keys = ("File",)

    def _load(self, folder: str) -> None:
        import os

        name = self.config.options.get("File", "model.keras") if self.config else "model.keras"
        path = os.path.join(folder, str(name))
        if not os.path.isfile(path):
            raise ModelSettingsError(f"no Keras file {path}")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        keras = _import("keras")
        try:
            model = keras.saving.load_model(path, compile=False)
        except (OSError, ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelSettingsError(f"cannot load {path}: {first}") from None
        by_name = {tensor.name: tensor for tensor in model.inputs}
        for spec in self._inputs:
            tensor = by_name.get(spec.tensor)
            if tensor is None:
                raise ModelSettingsError(f"Inputs: {spec.field}: the model has no input {spec.tensor!r} "
                                         f"(its inputs: {', '.join(by_name)})")
            _check_tensor(spec, keras.backend.standardize_dtype(tensor.dtype), list(tensor.shape))
        unmapped = [name for name in by_name if name not in {spec.tensor for spec in self._inputs}]
        if unmapped:
            raise ModelSettingsError(f"the model also takes {', '.join(unmapped)}: map them under Inputs")
        self._output_names = list(getattr(model, "output_names", None) or [])
        if self._outputs is not None and self._output_names:
            _check_outputs(self._outputs, self._output_names)
        self._model = model
        self._input_order = [tensor.name for tensor in model.inputs]

    def _call(self, inputs: dict[str, Any]) -> Mapping[str, Any]:
        import numpy as np

        given: Any = inputs[self._input_order[0]] if len(self._input_order) == 1 else inputs
        outputs = self._model.predict_on_batch(given)
        if isinstance(outputs, Mapping):
            named = dict(outputs)
        elif isinstance(outputs, (list, tuple)):
            named = dict(zip(self._output_names or [f"output_{i}" for i in range(len(outputs))], outputs, strict=False))
        else:
            named = {(self._output_names or ["output_0"])[0]: outputs}
        if self._outputs is not None:
            _check_outputs(self._outputs, list(named))
        return {name: np.asarray(value) for name, value in named.items()}


# --- helpers -------------------------------------------------------------------------------------


def _import(name: str) -> Any:
    """TensorFlow and Keras, imported when a worker loads a model (they ship no type hints)."""
    return importlib.import_module(name)


def _check_tensor(spec: TensorInput, dtype: str, shape: list[int | None] | None) -> None:
    """The declared dtype and shape must be what the model takes, checked once at load."""
    if dtype == "str":
        dtype = "string"
    if dtype != spec.dtype:
        raise ModelSettingsError(f"Inputs: {spec.field}: DType {spec.dtype}, but the model's {spec.tensor} is {dtype}")
    if shape is None:
        return
    if len(shape) != len(spec.shape) + 1:
        raise ModelSettingsError(f"Inputs: {spec.field}: Shape {spec.shape_text} (without the batch dimension), "
                                 f"but the model's {spec.tensor} has shape {_shape_text(shape)} with it")
    for declared, actual in zip(spec.shape, shape[1:], strict=True):
        if actual is not None and declared != actual:
            raise ModelSettingsError(f"Inputs: {spec.field}: Shape {spec.shape_text}, but the model's {spec.tensor} "
                                     f"takes {_shape_text(shape[1:])} per example")


def _check_outputs(outputs: tuple[tuple[str, str], ...] | None, names: list[str]) -> None:
    for _, name in outputs or ():
        if name not in names:
            raise ModelSettingsError(f"Outputs: the model has no output {name!r} (its outputs: {', '.join(names)})")


def _shape_text(shape: list[int | None]) -> str:
    return "[" + ", ".join("None" if size is None else str(size) for size in shape) + "]"


def _numpy_dtype(dtype: str) -> Any:
    if dtype == "string":
        return object
    return dtype


def _stack(values: list[Any], pad: Any) -> Any:
    """One batch array; with `pad`, each example padded to the largest size of each dimension."""
    import numpy as np

    if pad is None or not values:
        return np.stack(values)
    largest = tuple(max(sizes) for sizes in zip(*(value.shape for value in values), strict=True))
    padded = [value if value.shape == largest else
              np.pad(value, [(0, want - have) for want, have in zip(largest, value.shape, strict=True)],
                     constant_values=pad)
              for value in values]
    return np.stack(padded)


def _plain(value: Any) -> Any:
    """A row of an output as JSON-ready Python values (TensorFlow strings are bytes)."""
    plain = value.tolist() if hasattr(value, "tolist") else value
    return _decoded(plain)


def _decoded(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_decoded(item) for item in value]
    return value
