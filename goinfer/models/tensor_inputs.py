"""Request fields checked against a model's input tensors, without TensorFlow or numpy.

A model served from files (goinfer.models.tensorflow) declares, per request field, the tensor it
feeds, its dtype and its per-example shape. The HTTP tier checks every request against that
declaration before anything is queued, so a string where a float belongs, a list one value short
or a ragged list is refused with a clear message instead of failing deep inside TensorFlow in a
worker. This module is plain Python on purpose: the HTTP tier must not import TensorFlow (seconds
of start-up and hundreds of MB per process), nor pay for numpy on every request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from goinfer.errors import ApiError

# Codes of a refused request, with the ApiEntryFail prefix in the answer's message.
MISSING_INPUT = 1101
UNKNOWN_INPUT = 1102
WRONG_DTYPE = 1103
WRONG_SHAPE = 1104

_FLOATS = ("float16", "float32", "float64")
_INT_RANGES: dict[str, tuple[int, int]] = {
    "int8": (-(2**7), 2**7 - 1), "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1), "uint16": (0, 2**16 - 1), "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1),
}
DTYPES: tuple[str, ...] = (*_FLOATS, *_INT_RANGES, "bool", "string")

_INPUT_KEYS = ("Tensor", "DType", "Shape", "Pad")


class ModelSettingsError(ValueError):
    """A `Models:` entry that cannot serve a model; one line naming the key and what is wrong."""


@dataclass(frozen=True)
class TensorInput:
    """One request field: the tensor it feeds, its dtype and its shape without the batch dimension.

    `shape` holds a size per dimension, None where any size is accepted (a sequence length).
    `pad` (None: no padding) fills the variable dimensions when requests of different sizes are
    batched into one call; without it, only requests of equal shapes share a call.
    """

    field: str
    tensor: str
    dtype: str
    shape: tuple[int | None, ...]
    pad: Any = None

    @property
    def shape_text(self) -> str:
        return "[" + ", ".join("None" if size is None else str(size) for size in self.shape) + "]"


def parse_inputs(raw: Any) -> tuple[TensorInput, ...]:
    """The entry's `Inputs:` mapping: field -> {Tensor (default: the field), DType, Shape, Pad}."""
    if not isinstance(raw, Mapping) or not raw:
        raise ModelSettingsError("Inputs must map each request field to {Tensor, DType, Shape}, e.g. "
                                 "Inputs: {x: {Tensor: x, DType: float32, Shape: [4]}}")
    return tuple(_parse_input(str(field), spec) for field, spec in raw.items())


def _parse_input(field: str, spec: Any) -> TensorInput:
    where = f"Inputs: {field}:"
    if not isinstance(spec, Mapping):
        raise ModelSettingsError(f"{where} expected a mapping with DType and Shape, got {type(spec).__name__}")
    unknown = sorted(set(map(str, spec)) - set(_INPUT_KEYS))
    if unknown:
        raise ModelSettingsError(f"{where} unknown key {unknown[0]!r} (keys: {', '.join(_INPUT_KEYS)})")
    tensor = spec.get("Tensor", field)
    if not isinstance(tensor, str) or not tensor:
        raise ModelSettingsError(f"{where} Tensor must be the input tensor's name, got {tensor!r}")
    dtype = spec.get("DType")
    if dtype not in DTYPES:
        raise ModelSettingsError(f"{where} DType must be one of {', '.join(DTYPES)}; got {dtype!r}")
    shape = spec.get("Shape")
    if not isinstance(shape, list) or not all(
            size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 0) for size in shape):
        raise ModelSettingsError(f"{where} Shape must be a list of sizes without the batch dimension "
                                 f"(whole numbers, null for any size; [] for one value), got {shape!r}")
    pad = spec.get("Pad")
    if pad is not None:
        if None not in shape:
            raise ModelSettingsError(f"{where} Pad fills dimensions of any size, and Shape {shape} has none")
        problem = _value_problem(pad, dtype)
        if problem:
            raise ModelSettingsError(f"{where} Pad {problem}")
    return TensorInput(field, tensor, dtype, tuple(shape), pad)


def parse_outputs(raw: Any) -> tuple[tuple[str, str], ...] | None:
    """The entry's `Outputs:`: a list of output names, or a mapping answer field -> output name;
    None (no `Outputs:`) returns every output under its own name."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list) and raw and all(isinstance(name, str) and name for name in raw):
        return tuple((name, name) for name in raw)
    if isinstance(raw, Mapping) and raw and all(isinstance(name, str) and name for name in raw.values()):
        return tuple((str(field), name) for field, name in raw.items())
    raise ModelSettingsError(f"Outputs must be a list of output names or a mapping of answer field to "
                             f"output name, got {raw!r}")


class InputChecker:
    """Checks a request's `data` against the declared inputs; raises ApiError on the first fault."""

    def __init__(self, inputs: tuple[TensorInput, ...]) -> None:
        self.inputs = inputs
        self._names = ", ".join(spec.field for spec in inputs)

    def check(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """The params to queue: exactly the declared fields, each checked for dtype and shape.

        Unknown fields are refused rather than dropped: a misspelt optional field would otherwise
        be ignored without a word, and every field here is required anyway.
        """
        for field in data:
            if not any(spec.field == field for spec in self.inputs):
                raise ApiError(UNKNOWN_INPUT, f"unknown field {_short(field)} (the inputs are: {self._names})")
        params = {}
        for spec in self.inputs:
            if spec.field not in data:
                raise ApiError(MISSING_INPUT, f"missing input {spec.field!r} ({spec.dtype}, shape {spec.shape_text})")
            value = data[spec.field]
            _check_value(spec, value, spec.shape, spec.field, [])
            params[spec.field] = value
        return params


def _check_value(spec: TensorInput, value: Any, dims: tuple[int | None, ...], path: str,
                 lengths: list[tuple[int, str]]) -> None:
    """Walk the nested lists along `dims`; `lengths` holds, per depth below the top, the first length
    seen for a dimension of any size and where, so siblings of another length are ragged."""
    if not dims:
        if isinstance(value, list):
            raise ApiError(WRONG_SHAPE, f"input {spec.field} must have shape {spec.shape_text}: "
                                        f"{path} is a list, expected one {spec.dtype} value")
        problem = _value_problem(value, spec.dtype)
        if problem:
            raise ApiError(WRONG_DTYPE, f"input {path} {problem}")
        return
    size = dims[0]
    if not isinstance(value, list):
        raise ApiError(WRONG_SHAPE, f"input {spec.field} must have shape {spec.shape_text}: "
                                    f"{path} is {_kind(value)}, expected a list")
    if size is not None and len(value) != size:
        raise ApiError(WRONG_SHAPE, f"input {spec.field} must have shape {spec.shape_text}: "
                                    f"{path} has {len(value)} values, expected {size}")
    depth = len(spec.shape) - len(dims)
    if size is None:
        if depth < len(lengths):
            first, where = lengths[depth]
            if len(value) != first:
                raise ApiError(WRONG_SHAPE, f"input {spec.field} is ragged: {path} has {len(value)} values "
                                            f"and {where} has {first}")
        else:
            lengths.append((len(value), path))
    elif depth == len(lengths):
        lengths.append((size, path))
    for index, item in enumerate(value):
        _check_value(spec, item, dims[1:], f"{path}[{index}]", lengths)


def _value_problem(value: Any, dtype: str) -> str | None:
    """Why `value` cannot be one element of a `dtype` tensor, or None when it can."""
    if dtype in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a {dtype} number, got {_kind(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite {dtype} number, got {value}"
        return None
    if dtype in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            shown = f"{value!r}" if isinstance(value, float) else _kind(value)
            return f"must be a whole {dtype} number, got {shown}"
        low, high = _INT_RANGES[dtype]
        if not low <= value <= high:
            return f"must be within the {dtype} range [{low}, {high}], got {value}"
        return None
    if dtype == "bool":
        return None if isinstance(value, bool) else f"must be true or false, got {_kind(value)}"
    return None if isinstance(value, str) else f"must be a string, got {_kind(value)}"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    kinds = {str: "a string", type(None): "null", dict: "an object", list: "a list"}
    return kinds.get(type(value), type(value).__name__)


def _short(text: str, limit: int = 40) -> str:
    """A client's field name in a message, cut short: the answer echoes it."""
    return repr(text if len(text) <= limit else text[:limit] + "…")
