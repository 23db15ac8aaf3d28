"""Dynamic batching: how many requests a worker takes at once, how long it waits for more, and
which of them run together.

Take-ahead, for models that cannot batch: while requests wait and every worker is busy, a worker
takes as many as it expects to run within `Server.TakeAheadMs` (from its recent call times,
`CallTimes`) and answers them in one round trip. Each request it takes beside the first waits
for the calls before it, at most about TakeAheadMs in all, so only fast models take ahead: a
10 ms model takes one at a time, an echo dozens, and the Redis commands and worker CPU per
request fall with the round trips.

A model with `infer_batch` runs one forward pass for several requests, which on CPUs and GPUs
costs far less than one pass each. The worker reads up to the batch size in one XREADGROUP and,
when fewer are waiting, reads again until the batch is full or `BatchTimeoutMs` has passed since
the first arrived. Models with only `infer` never wait. The decisions are pure functions over
the requests' api paths, so they hold for any item type and are tested without Redis.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from goinfer.models.base import Model
from goinfer.settings import ServerSettings

T = TypeVar("T")

# Most requests one take-ahead read may take (a bound on one round trip's size).
TAKE_AHEAD_LIMIT = 32
# Reading ahead (overlapping a round trip with the calls) pays only while the round trip is a
# visible share of a call; for slower models a request read ahead could wait a whole call on this
# worker while another frees up first.
READ_AHEAD_MAX_CALL_S = 0.05
# How much a new call time moves a model's estimate.
_CALL_TIME_WEIGHT = 0.2

# Redis checks short BLOCK timeouts only on its 100 ms cron tick (a 5 ms BLOCK can last 100 ms),
# so a partial batch is topped up by polling without BLOCK, this far apart.
BATCH_POLL_S = 0.001


@dataclass(frozen=True)
class BatchPolicy:
    """One model's batching limits."""

    size: int
    timeout_s: float


@dataclass(frozen=True)
class Work(Generic[T]):
    """One call to a model: `infer` for a single item, or `infer_batch` for `items`."""

    api: str
    items: list[T]
    batched: bool


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


def read_size(policies: Mapping[str, BatchPolicy]) -> int:
    """How many entries one read takes: the largest batch size, 1 when nothing batches."""
    return max((p.size for p in policies.values()), default=1)


def chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def wants_more(policies: Mapping[str, BatchPolicy], counts: Mapping[str, int]) -> float:
    """How long (seconds) the fullest-waiting batchable model is still willing to wait; 0 if none.

    A model is willing while it has at least one request but fewer than its batch size.
    """
    waits = [policies[api].timeout_s for api, n in counts.items() if api in policies and 0 < n < policies[api].size]
    return max(waits, default=0.0)


def fill(items: list[T], read: Callable[[int], list[T]], api_of: Callable[[T], str | None],
         policies: Mapping[str, BatchPolicy], limit: int) -> list[T]:
    """Read more (`read(n)`, without blocking) while a batchable model has a partial batch and is
    still willing to wait, counted from now; at most `limit` items in all."""
    if not policies:
        return items
    started = time.monotonic()
    while len(items) < limit:
        counts = Counter(api for api in map(api_of, items) if api is not None)
        remaining = started + wants_more(policies, counts) - time.monotonic()
        if remaining <= 0:
            break
        more = read(limit - len(items))
        if more:
            items = items + more
        else:
            time.sleep(min(remaining, BATCH_POLL_S))
    return items


def plan(items: Sequence[T], api_of: Callable[[T], str], policies: Mapping[str, BatchPolicy]) -> list[Work[T]]:
    """The calls that run `items`: first each item of a model that cannot batch, alone, in arrival
    order; then each batchable model's items in chunks of its batch size, models in the order
    their first item arrived."""
    singles: list[Work[T]] = []
    groups: dict[str, list[T]] = {}
    for item in items:
        api = api_of(item)
        if api in policies:
            groups.setdefault(api, []).append(item)
        else:
            singles.append(Work(api, [item], batched=False))
    batches = [Work(api, chunk, batched=True) for api, grouped in groups.items()
               for chunk in chunks(grouped, policies[api].size)]
    return singles + batches


class CallTimes:
    """Each model's recent call time (a moving average), to know what taking ahead would cost."""

    def __init__(self, apis: Sequence[str], budget_s: float) -> None:
        self._apis = list(apis)
        self._budget_s = budget_s
        self._seconds: dict[str, float] = {}

    def observe(self, api: str, seconds: float) -> None:
        old = self._seconds.get(api)
        self._seconds[api] = seconds if old is None else old + _CALL_TIME_WEIGHT * (seconds - old)

    def take(self) -> int:
        """How many waiting requests one read may take: as many as the slowest model's calls fit
        in the budget (1 until every model has run once: an unknown model may be slow)."""
        if self._budget_s <= 0 or not self._apis:
            return 1
        times = [self._seconds.get(api) for api in self._apis]
        if any(t is None for t in times):
            return 1
        slowest = max(t for t in times if t is not None)
        return max(1, min(TAKE_AHEAD_LIMIT, int(self._budget_s / max(slowest, 1e-6))))

    def quick(self) -> bool:
        """Whether every model's calls are short enough to read ahead for (READ_AHEAD_MAX_CALL_S)."""
        times = [self._seconds.get(api) for api in self._apis]
        return bool(times) and all(t is not None and t < READ_AHEAD_MAX_CALL_S for t in times)

    def may_hold(self, api: str, held_s: float) -> bool:
        """Whether replies already held `held_s` may wait for one more call of `api` to be sent
        together: only when that call is expected to end within the budget."""
        expected = self._seconds.get(api)
        return self._budget_s > 0 and expected is not None and held_s + expected <= self._budget_s
