"""The one class a user writes: how a request is checked (HTTP tier) and answered (worker)."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

NOAPI_PREFIX = "__noapi__"


class Model(abc.ABC):
    """Subclass this to serve a model; go-infer's `types.Model` interface as a Python class.

    Class attributes:
        api_path: the URL path the HTTP tier routes to this model, e.g. "/api/embedding". A path
            starting with "__noapi__" is served by dispatchers but not routed by the HTTP tier.
        queue: a custom queue name (go-infer's CustomQueue); "" means the settings' QueueName.

    One instance lives in the HTTP process (only `api_entry` is called there) and one in every
    worker process (`init` once, then `infer` per request), so instances must not share state
    across tiers. `self.settings` is the loaded Settings; `self.customer` its `Customer:` section.

    Dynamic batching: a model that also defines

        def infer_batch(self, batch: list[tuple[str, dict]]) -> list[dict | ApiError]

    gets up to `batch_size` waiting requests at once (one forward pass for all of them), in
    request order, and returns one result per request; an `ApiError` *returned* (not raised) in
    place of a result fails that request alone. A model with only `infer` is never batched.
    `batch_size` / `batch_timeout_ms` override the settings' Server.BatchSize / BatchTimeoutMs.
    """

    api_path: ClassVar[str]
    queue: ClassVar[str] = ""
    batch_size: ClassVar[int | None] = None
    batch_timeout_ms: ClassVar[float | None] = None

    settings: Any = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Catch the easy mistakes where they are made, not at the first request.
        path = cls.__dict__.get("api_path")
        if path is not None and not isinstance(path, str):
            raise TypeError(f"{cls.__qualname__}.api_path must be a string, got {path!r}")
        queue = cls.__dict__.get("queue")
        if queue is not None and not isinstance(queue, str):
            raise TypeError(f"{cls.__qualname__}.queue must be a string, got {queue!r}")

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

        Runs on the HTTP tier's event loop: keep it to validation and light reshaping. Raise
        `goinfer.ApiError(code, msg)` to refuse a request with your own code.
        """

    @abc.abstractmethod
    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """Run the model in a worker process; the returned dict is the response's `data`."""
