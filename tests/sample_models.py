"""Models used by the tests: each exercises one path of the framework."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import redis

from goinfer import ApiError, Model
from goinfer.models.echo import Echo


def recording_list(model: Model, suffix: str = "executions") -> tuple[redis.Redis, str]:
    """The test's Redis and the key `<QueueName><suffix>` where a model records what it ran, for
    the test to count executions (each test's queue name is its own)."""
    host, _, port = model.settings.server.redis_server.rpartition(":")
    return redis.Redis(host=host, port=int(port)), f"{model.settings.server.queue_name}{suffix}"


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
        self.redis, self.key = recording_list(self)

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


class GilHolder(Model):
    """Holds the GIL for `hold_s` seconds, as a model running native code that never releases it
    does: no other thread of its worker runs meanwhile. The time is spent in C calls (sums over a
    range) back to back, with the interpreter's switch interval raised above `hold_s` so that no
    waiting thread is handed the GIL between two of them: one long C call, of a known length on
    any machine. A request run again holds `again_s` (default `hold_s`). Counts in Redis each
    request's starts and completions, and the pids of the workers that started it (under its
    `label`, else its request id).
    """

    api_path = "/api/hold"

    def init(self) -> None:
        self.redis, self.key = recording_list(self, "hold:")

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        self.redis.rpush(f"{self.key}pids:{params.get('label', request_id)}", os.getpid())
        starts = self.redis.hincrby(f"{self.key}starts", request_id, 1)
        hold = float(params.get("hold_s", 0) if starts == 1 else params.get("again_s", params.get("hold_s", 0)))
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(hold + 60)
        try:
            started = time.monotonic()
            while time.monotonic() - started < hold:
                sum(range(200_000))
            held = time.monotonic() - started
        finally:
            sys.setswitchinterval(switch_interval)
        self.redis.hincrby(f"{self.key}done", request_id, 1)
        return {"held_s": round(held, 3), "starts": starts, "pid": os.getpid()}


class PatientGilHolder(GilHolder):
    """A GilHolder whose own limit is longer than the settings'."""

    api_path = "/api/hold-patient"
    max_infer_seconds = 60


class ImpatientGilHolder(GilHolder):
    """A GilHolder whose own limit is shorter than the settings'."""

    api_path = "/api/hold-impatient"
    max_infer_seconds = 1.5



class Gated(Model):
    """Runs a request once the file `data.gate` exists (up to a minute), then appends its request
    id to the file `data.log`: holds requests in `infer` while a test breaks Redis, and counts
    executions without needing Redis to write."""

    api_path = "/api/gated"

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        gate, deadline = str(params["gate"]), time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
        with open(str(params["log"]), "a") as log:
            log.write(request_id + "\n")
        return {"i": params.get("i"), "pid": os.getpid()}


def _unsendable(kind: str) -> dict[str, Any]:
    """A result JSON cannot carry."""
    if kind == "deep":
        nested: dict[str, Any] = {}
        for _ in range(100_000):
            nested = {"a": nested}
        return {"deep": nested}
    return {"nan": {"x": float("nan")}, "inf": {"x": float("inf")}, "-inf": {"x": -float("inf")},
            "surrogate": {"x": "lone \udc80 surrogate"}}[kind]


class Unsendable(Model):
    """Batches, and answers each request as `data.kind` says: normally (naming the requests of its
    batch), or with a result JSON cannot carry (nan, inf, -inf, surrogate, deep: nested 100,000
    levels). `data.entry: surrogate` makes api_entry return a lone surrogate."""

    api_path = "/api/unsendable"
    batch_size = 32
    batch_timeout_ms = 100

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("entry") == "surrogate":
            return {"text": "lone \ud800 surrogate"}
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return self.infer_batch([(request_id, params)])[0]

    def infer_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        ids = [request_id for request_id, _ in batch]
        return [_unsendable(str(params["kind"])) if params.get("kind")
                else {"i": params.get("i"), "batch": ids, "pid": os.getpid()} for _, params in batch]


class BatchRecorder(Recorder):
    """A Recorder that batches: what a worker took in one read runs as one infer_batch call."""

    api_path = "/api/record-batch"
    batch_size = 16
    batch_timeout_ms = 50

    def infer_batch(self, batch: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        return [self.infer(request_id, params) for request_id, params in batch]


class Unencodable(Echo):
    """Its api_entry returns text no UTF-8 encoder takes (a lone surrogate) when asked: such a
    request must fail alone, not with the requests that travel with it to Redis."""

    api_path = "/api/unencodable"

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return {"text": "\ud800" if data.get("bad") else "fine", "i": data.get("i")}


class SlowEntry(Model):
    """Its api_entry sleeps `data.sleep` seconds, as one that calls a slow service would."""

    api_path = "/api/slow-entry"

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(data.get("sleep", 0)))
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"slept": params.get("sleep", 0)}


class FileRecorder(Model):
    """Sleeps `data.sleep` seconds, then appends the request id to the file named by the setting
    Customer.ExecutionsFile, one line per execution, and answers with the request's `i`: a record
    of what ran that does not live in Redis, so it survives whatever Redis loses."""

    api_path = "/api/record-file"

    def init(self) -> None:
        self.path = str(self.customer["ExecutionsFile"])

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(params.get("sleep", 0)))
        with open(self.path, "a", encoding="utf-8") as executions:  # O_APPEND: one whole line per write
            executions.write(f"{request_id}\n")
        return {"request_id": request_id, "i": params.get("i")}


class VersionedAnswer(Model):
    """Serves the text of `answer.txt` in its version folder, after `warmup_s` (from `warmup.txt`
    there, default 0) of warm-up; a folder with `broken.txt` fails its init. Records each
    execution in Redis (key `<QueueName>executions`, as Recorder) with the version that ran it."""

    api_path = "/api/versioned"

    def init(self) -> None:
        assert self.version_path is not None and self.version is not None
        folder = self.version_path
        if os.path.exists(os.path.join(folder, "broken.txt")):
            raise RuntimeError(f"version {self.version} is broken")
        with open(os.path.join(folder, "answer.txt")) as handle:
            self.answer = handle.read().strip()
        warmup_file = os.path.join(folder, "warmup.txt")
        self.warmup_s = float(open(warmup_file).read()) if os.path.exists(warmup_file) else 0.0
        self.redis, self.key = recording_list(self)
        self.warmed = False

    def warmup(self) -> None:
        time.sleep(self.warmup_s)
        self.warmed = True

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(params.get("sleep", 0)))
        self.redis.rpush(self.key, f"{request_id} {self.version}")
        return {"version": self.version, "answer": self.answer, "warmed": self.warmed, "pid": os.getpid()}


class WarmupCounter(Model):
    """Counts the warm-up calls its worker ran (its `warmup_params` plus the settings' `Warmup:`)
    before it answered its first request."""

    api_path = "/api/warm-count"
    warmup_params = ({"text": "from the class"},)

    def init(self) -> None:
        self.warm_calls: list[dict[str, Any]] = []

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        if request_id.startswith("warmup-"):
            self.warm_calls.append(params)
        return {"warm_calls": list(self.warm_calls), "pid": os.getpid()}


class FailingWarmup(Echo):
    """Initialises, then fails its warm-up the way a model missing its GPU would."""

    api_path = "/api/failing-warmup"

    def warmup(self) -> None:
        raise RuntimeError("warm-up failed: no GPU here")


class Placement(Model):
    """Says which device its worker was placed on (the environment it started with) and its pid."""

    api_path = "/api/placement"

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"),
                "pid": os.getpid()}


class CachedCounter(Model):
    """For the result cache: records each execution in Redis (key `<QueueName>executions`, as
    Recorder); `fail` answers ApiError 7001. Its cache_key rounds `x` to one decimal (near-equal
    requests share an answer), returns None for `nocache` and raises for `badkey`."""

    api_path = "/api/cached"

    def init(self) -> None:
        self.redis, self.key = recording_list(self)

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def cache_key(self, params: dict[str, Any]) -> str | None:
        if params.get("nocache"):
            return None
        if params.get("badkey"):
            raise ValueError("no key for this request")
        rounded = dict(params)
        if isinstance(rounded.get("x"), (int, float)):
            rounded["x"] = round(float(rounded["x"]), 1)
        return super().cache_key(rounded)

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        self.redis.rpush(self.key, request_id)
        if params.get("fail"):
            raise ApiError(7001, "asked to fail")
        return {"x": params.get("x"), "computed_by": request_id, "pid": os.getpid()}


class LoadsOnce(VersionedAnswer):
    """VersionedAnswer whose version folder with `once.txt` loads in one worker only: the next
    worker to load that version fails its init (a version that breaks halfway through a rollover)."""

    api_path = "/api/loads-once"

    def init(self) -> None:
        assert self.version_path is not None
        if os.path.exists(os.path.join(self.version_path, "once.txt")):
            try:
                os.close(os.open(os.path.join(self.version_path, "loaded"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                raise RuntimeError(f"version {self.version} loads only once") from None
        super().init()


class Doubler(Model):
    """A fast model for batch runs: doubles `x`; api_entry refuses rows marked `refuse`, infer
    fails rows marked `fail`."""

    api_path = "/api/double"

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("refuse"):
            raise ApiError(4100, "refused at entry")
        if not isinstance(data.get("x"), (int, str)):
            raise ApiError(4101, "need x")
        return {"x": int(data["x"]), "fail": bool(data.get("fail"))}

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        if params["fail"]:
            raise ApiError(4200, "asked to fail")
        return {"double": params["x"] * 2}


class EntryThread(Model):
    """Answers with the name of the thread its api_entry ran in (in the HTTP process); its
    api_entry raises SystemExit when asked (`exit`)."""

    api_path = "/api/entry-thread"

    def init(self) -> None:
        pass

    def api_entry(self, data: dict[str, Any]) -> dict[str, Any]:
        import threading

        if data.get("exit"):
            raise SystemExit("asked to exit")
        return {"thread": threading.current_thread().name}

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        return params


class EntryThreadOnLoop(EntryThread):
    """EntryThread with Model.api_entry_on_loop."""

    api_path = "/api/entry-thread-on-loop"
    api_entry_on_loop = True
