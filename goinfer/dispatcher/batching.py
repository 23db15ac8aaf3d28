"""Dynamic batching: how many requests a worker takes at once, and how long it waits for more.

A model with `infer_batch` runs one forward pass for several requests, which on CPUs and GPUs
costs far less than one pass each. The worker reads up to the batch size in one XREADGROUP and,
when fewer are waiting, reads again until the batch is full or `BatchTimeoutMs` has passed since
the first arrived. Models with only `infer` never wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from goinfer.models.base import Model
from goinfer.settings import ServerSettings


@dataclass(frozen=True)
class BatchPolicy:
    """One model's batching limits."""

    size: int
    timeout_s: float


def batch_policies(server: ServerSettings, models: Mapping[str, Model]) -> dict[str, BatchPolicy]:
    """The batching limits of every model that can batch, keyed by api path."""
    policies = {}
    for path, model in models.items():
        if not model.supports_batching():
            continue
        size = model.batch_size if model.batch_size is not None else server.batch_size
        timeout_ms = model.batch_timeout_ms if model.batch_timeout_ms is not None else server.batch_timeout_ms
        policies[path] = BatchPolicy(max(1, int(size)), max(0.0, float(timeout_ms)) / 1000.0)
    return policies


def chunks(items: list, size: int) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def wants_more(policies: Mapping[str, BatchPolicy], counts: Mapping[str, int]) -> float:
    """How long (seconds) the fullest-waiting batchable model is still willing to wait; 0 if none.

    A model is willing while it has at least one request but fewer than its batch size.
    """
    waits = [policies[api].timeout_s for api, n in counts.items() if api in policies and 0 < n < policies[api].size]
    return max(waits, default=0.0)
