"""The one class a user writes: how a request is checked (HTTP tier) and answered (worker)."""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from goinfer.settings import ModelConfig

NOAPI_PREFIX = "__noapi__"


class Model(abc.ABC):
    """Subclass this to serve a model; go-infer's `types.Model` interface as a Python class.

    Class attributes:
        api_path: the URL path the HTTP tier routes to this model, e.g. "/api/embedding". A path
            starting with "__noapi__" is served by dispatchers but not routed by the HTTP tier.
        queue: a custom queue name (go-infer's CustomQueue); "" means the settings' QueueName.

    One instance lives in the HTTP process (only `api_entry` is called there, in threads) and
    one in every worker process (`init` once, then `infer` per request), so instances must not
    share state across tiers. `self.settings` is the loaded Settings; `self.customer` its
    `Customer:` section.

    Dynamic batching: a model that also defines

        def infer_batch(self, batch: list[tuple[str, dict]]) -> list[dict | ApiError]

    gets up to `batch_size` waiting requests at once (one forward pass for all of them), in
    request order, and returns one result per request; an `ApiError` *returned* (not raised) in
    place of a result fails that request alone. A model with only `infer` is never batched.
    `batch_size` / `batch_timeout_ms` override the settings' Server.BatchSize / BatchTimeoutMs.

    `api_entry_on_loop = True` says that `api_entry` only checks and reshapes `data`, quickly and
    without ever waiting (no I/O, sleep or lock), so the HTTP tier calls it on its event loop
    instead of in a thread of the model's pool: the hand-off to a thread and back costs more CPU
    (~0.05 ms per request) than such an api_entry. The price is the pool's protection: while it
    runs, no other request of the HTTP process moves, so one that blocks stalls them all. Off by
    default; the built-in Echo model sets it.

    `max_infer_seconds` overrides Server.MaxInferSeconds for this model: one call of `infer` (or
    `infer_batch`) running longer is stuck, its worker is stopped and its requests are answered
    InferFail. A call that is merely slow, within it, runs once, however long it holds the GIL.

    Versions: a `Models:` entry with `ModelBasePath` (TF Serving's `<base>/<number>/` folders)
    gives every worker `self.version` and `self.version_path`, the folder `init` loads, before
    `init` runs; the dispatcher rolls its workers over to a newer folder when one appears.
    `self.config` is that entry (its other keys in `self.config.options`), None for a plain one.

    Warm-up: `warmup()` runs in every worker after `init` and before it takes a request, so the
    first client does not pay for lazy loading (graph tracing, kernel selection). By default it
    runs `warmup_params` and the entry's `Warmup:` params through `infer_batch` (or `infer`).
    """

    api_path: ClassVar[str]
    queue: ClassVar[str] = ""
    batch_size: ClassVar[int | None] = None
    batch_timeout_ms: ClassVar[float | None] = None
    max_infer_seconds: ClassVar[float | None] = None
    api_entry_on_loop: ClassVar[bool] = False
    warmup_params: ClassVar[Sequence[dict[str, Any]]] = ()

    settings: Any = None
    config: ModelConfig | None = None
    version: int | None = None
    version_path: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Catch the easy mistakes where they are made, not at the first request.
        path = cls.__dict__.get("api_path")
        if path is not None and not isinstance(path, str):
            raise TypeError(f"{cls.__qualname__}.api_path must be a string, got {path!r}")
        queue = cls.__dict__.get("queue")
        if queue is not None and not isinstance(queue, str):
            raise TypeError(f"{cls.__qualname__}.queue must be a string, got {queue!r}")
        on_loop = cls.__dict__.get("api_entry_on_loop")
        if on_loop is not None and not isinstance(on_loop, bool):
            raise TypeError(f"{cls.__qualname__}.api_entry_on_loop must be True or False, got {on_loop!r}")
        limit = cls.__dict__.get("max_infer_seconds")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                                  or not 0 < limit < float("inf")):
            raise TypeError(f"{cls.__qualname__}.max_infer_seconds must be a positive number of seconds, "
                            f"got {limit!r}")

    @classmethod
    def supports_batching(cls) -> bool:
        return callable(getattr(cls, "infer_batch", None))

    @property
    def customer(self) -> Mapping[str, Any]:
        """The free key-values of the settings' `Customer:` section."""
        return self.settings.customer if self.settings is not None else {}

    @abc.abstractmethod
    def init(self) -> None:
        """Load weights. Called once in every worker process before it takes requests."""

    @abc.abstractmethod
    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        """Check the request's `data` in the HTTP tier; return the params put on the queue.

        Runs in a thread of this model's own pool in the HTTP process (API.ApiEntryThreads of
        them; 0, or the class attribute `api_entry_on_loop`, puts it on the event loop), so a
        slow call delays only this model's requests;
        several calls may run at once, so keep shared state thread-safe. When all threads are
        busy and API.MaxWaitingApiEntries requests wait, the next is refused with ApiEntryBusy
        (9714). Threads share the GIL: keep heavy computation for `infer`. Raise
        `goinfer.ApiError(code, msg)` to refuse a request with your own code; any other
        exception answers ApiEntryFail (9701) with its message.
        """

    @abc.abstractmethod
    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """Run the model in a worker process; the returned dict is the response's `data`."""

    def warmup(self) -> None:
        """Run sample requests before serving; an exception here fails the worker's start like `init`."""
        entry = self.config.warmup if isinstance(self.config, ModelConfig) else ()
        samples = [dict(params) for params in (*self.warmup_params, *entry)]
        if not samples:
            return
        if self.supports_batching():
            results = self.infer_batch([(f"warmup-{i}", params) for i, params in enumerate(samples)])  # type: ignore[attr-defined]
            failed = [result for result in results if isinstance(result, BaseException)]
            if failed:
                raise failed[0]
            return
        for i, params in enumerate(samples):
            self.infer(f"warmup-{i}", params)

    def cache_key(self, params: dict[str, Any]) -> str | None:
        """The text that identifies `params` (what `api_entry` returned) in the result cache.

        Two requests with the same key get the same answer from the cache, for as long as this
        model's version and code stay the same. Override it to make near-equal requests share
        an answer (round floats, drop a field the model ignores), or return None to never cache
        this request.
        """
        return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
