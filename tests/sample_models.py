"""Models used by the tests: each exercises one path of the framework."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from goinfer import ApiError, Model
from goinfer.models.echo import Echo


class Greeter(Model):
    """A well-behaved model: checks its input in api_entry, answers in infer."""

    api_path = "/api/greet"

    def init(self) -> None:
        self.greeting = self.customer.get("Greeting", "hello")

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        name = data.get("name")
        if not isinstance(name, str):
            raise ApiError(1001, "need name")
        return {"name": name}

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"greeting": f"{self.greeting}, {params['name']}", "tag": os.environ.get("GOINFER_TEST_TAG", "")}


class Faulty(Model):
    """Fails where and how `data.mode` says."""

    api_path = "/api/faulty"

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        mode = data.get("mode")
        if mode == "entry-apierror":
            raise ApiError(4321, "bad field x")
        if mode == "entry-exception":
            raise ValueError("entry blew up")
        if mode == "entry-not-dict":
            return ["not", "a", "dict"]  # type: ignore[return-value]
        if mode == "entry-not-json":
            return {"value": object()}
        return {"mode": mode}

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        mode = params.get("mode")
        if mode == "infer-apierror":
            raise ApiError(5432, "cannot infer this")
        if mode == "infer-exception":
            raise RuntimeError("infer blew up")
        if mode == "infer-not-dict":
            return "oops"  # type: ignore[return-value]
        if mode == "infer-not-json":
            return {"value": object()}
        return {"ok": True}


class Recorder(Model):
    """Records every execution in Redis, to count how often each request ran."""

    api_path = "/api/record"

    def init(self) -> None:
        host, _, port = self.settings.server.redis_server.rpartition(":")
        self.redis = redis.Redis(host=host, port=int(port))
        self.key = f"{self.settings.server.queue_name}executions"

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(params.get("sleep", 0)))
        self.redis.rpush(self.key, request_id)
        return {"request_id": request_id, "tag": os.environ.get("GOINFER_TEST_TAG", ""), "pid": os.getpid()}


class CustomQueued(Echo):
    """Lives on its own queue (go-infer's CustomQueue)."""

    api_path = "/api/custom"
    queue = "goinfer-test-custom-queue-"

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"served": "custom", **params}


class Hidden(Echo):
    """Served by dispatchers, never routed by the HTTP tier."""

    api_path = "__noapi__/hidden"


class BrokenInit(Model):
    """Its weights "cannot be loaded": the dispatcher must stop with a clear message."""

    api_path = "/api/broken"

    def init(self) -> None:
        raise RuntimeError("weights file /nonexistent/model.bin not found")

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return {}


class Batcher(Model):
    """Batches: answers each request with the size of the batch it ran in."""

    api_path = "/api/batch"
    batch_size = 8
    batch_timeout_ms = 50

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return self.infer_batch([(request_id, params)])[0]

    def infer_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        if any(params.get("explode") for _, params in batch):
            raise RuntimeError("the whole batch failed")
        if any(params.get("wrong-length") for _, params in batch):
            return []
        return [
            ApiError(6001, f"item {params.get('i')} failed") if params.get("fail")
            else {"batch": len(batch), "i": params.get("i"), "request_id": request_id}
            for request_id, params in batch
        ]


class Crasher(Model):
    """Kills its worker process outright for a request that says so: a poison request."""

    api_path = "/api/crash"

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("crash"):
            os._exit(17)
        time.sleep(float(params.get("sleep", 0)))
        return {"ok": True}


class WrongInferSignature(Model):
    """Its infer forgets request_id: refused at registration, so at start and by `goinfer check`."""

    api_path = "/api/wrong-infer"

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, params: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        return params


class Suicidal(Model):
    """Kills its worker with every request it runs: a crash loop for the restart limit."""

    api_path = "/api/suicide"

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        os._exit(1)


class SlowInit(Echo):
    """Takes SLOW_INIT_S seconds (default 60) to "load its weights", and says when it starts."""

    api_path = "/api/slow-init"

    def init(self) -> None:
        print(f"slow init started in {os.getpid()}", flush=True)
        time.sleep(float(os.environ.get("SLOW_INIT_S", "60")))
