"""Model versions: TF Serving's <base>/<number>/ folders, and the version each answer was computed by."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from goinfer.client import Client
from goinfer.queue import CONSUMER_GROUP, DispatcherHeartbeat, dispatcher_key, revision_version, stream_name

from conftest import APP_ID, APP_SECRET, free_port, settings_of, url_of, wait_until, write_settings

VERSIONED = "sample_models:VersionedAnswer"


def publish(base: Path, number: int, answer: str, **files: str) -> Path:
    """Write a version folder the way a deployment should: under another name, then renamed."""
    staging = base / f".tmp-{number}"
    staging.mkdir(parents=True)
    (staging / "answer.txt").write_text(answer)
    for name, text in files.items():
        (staging / name).write_text(text)
    final = base / str(number)
    staging.rename(final)
    return final


def versioned_settings(tmp_path: Path, redis_address: str, base: Path, **entry: object) -> Path:
    return write_settings(tmp_path, redis_address, Models=[{"Class": VERSIONED, "ModelBasePath": str(base), **entry}])


def test_the_newest_version_folder_is_loaded_and_warmed_up_before_serving(tmp_path, redis_server, processes):
    base = tmp_path / "models"
    publish(base, 1, "one")
    publish(base, 10, "ten")  # numbers, not text: 10 is newer than 9 and 1
    publish(base, 9, "nine")
    (base / "11.partial").mkdir()  # not a version: being copied
    settings = versioned_settings(tmp_path, redis_server.address, base)
    processes.http(settings)
    server = processes.server(settings)
    answer = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256").call("/api/versioned", {})
    assert (answer["version"], answer["answer"], answer["warmed"]) == (10, "ten", True)
    assert f"serving version 10 from {base / '10'}" in server.output


def test_a_pinned_version_is_served_and_a_missing_one_stops_the_dispatcher(tmp_path, redis_server, processes):
    base = tmp_path / "models"
    publish(base, 1, "one")
    publish(base, 2, "two")
    settings = versioned_settings(tmp_path, redis_server.address, base, ModelVersion=1)
    processes.http(settings)
    processes.server(settings)
    answer = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256").call("/api/versioned", {})
    assert (answer["version"], answer["answer"]) == (1, "one")

    (tmp_path / "missing").mkdir()
    missing = versioned_settings(tmp_path / "missing", redis_server.address, base, ModelVersion=3)
    server = processes.start("server", "0", "--yaml", str(missing))
    assert server.process.wait(60) == 1
    assert f"ModelVersion 3 is not under {base} (versions found: 1, 2)" in server.output
    assert "Traceback" not in server.output


# --- rolling over: new versions, reloads ---------------------------------------------------------

def heartbeat(redis_server, server) -> DispatcherHeartbeat:
    """The dispatcher's heartbeat as Redis holds it now."""
    raw = redis_server.client().get(dispatcher_key(socket.gethostname(), server.pid))
    assert raw is not None, "no heartbeat"
    beat = DispatcherHeartbeat.decode(raw)
    assert beat is not None
    return beat


def worker_pids(server) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    pids = set()
    for task in Path(f"/proc/{server.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in command:
                pids.add(int(child))
    return pids


def executions(redis_server, settings) -> list[str]:
    key = settings_of(settings)["Server"]["QueueName"] + "executions"
    return [item.decode() for item in redis_server.client().lrange(key, 0, -1)]


@dataclass
class Sent:
    sent: float
    done: float
    request_id: str = ""
    version: int | None = None
    error: str = ""


class Load:
    """Client threads sending requests back to back until stopped, each outcome kept."""

    def __init__(self, url: str, threads: int) -> None:
        self.results: list[Sent] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, args=(url,)) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _send(self, url: str) -> None:
        api = Client(url, APP_ID, APP_SECRET, sign_type="SHA256", timeout=60)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = api.call("/api/versioned", {})
                result = Sent(started, time.monotonic(), answer["requestId"], answer["version"])
            except Exception as exc:  # noqa: BLE001 - every failure is a finding of the test
                result = Sent(started, time.monotonic(), error=f"{type(exc).__name__}: {exc}")
            with self._lock:
                self.results.append(result)


def test_a_new_version_is_rolled_out_under_load_and_a_broken_one_is_refused(tmp_path, redis_server, processes):
    base = tmp_path / "models"
    warmup_s = 1.5
    publish(base, 1, "one", **{"warmup.txt": str(warmup_s)})
    metrics_port = free_port()
    settings = write_settings(tmp_path, redis_server.address,
                              Models=[{"Class": VERSIONED, "ModelBasePath": str(base)}],
                              Server={"MaxWorkers": 2, "ModelPollS": 0.5, "MessageTimeout": 60,
                                      "MetricsPort": metrics_port})
    processes.http(settings)
    server = processes.server(settings)
    url = url_of(settings)
    with Load(url, threads=4) as load:
        time.sleep(1.0)
        published = time.monotonic()
        publish(base, 2, "two", **{"warmup.txt": str(warmup_s)})
        server.wait_for_output("rolled over to version 2: all 2 workers replaced", 90)
        switched = time.monotonic()
        time.sleep(1.5)
    results = load.results
    assert [r.error for r in results if r.error] == []
    request_ids = [r.request_id for r in results]
    ran = executions(redis_server, settings)
    assert sorted(entry.split()[0] for entry in ran) == sorted(request_ids)  # each executed exactly once
    assert {r.version for r in results} == {1, 2}
    assert all(r.version == 2 for r in results if r.sent > switched)  # after the switch, only version 2
    last_one = max(r.done for r in results if r.version == 1)
    first_two = min(r.done for r in results if r.version == 2)
    assert last_one > published  # the old workers served on while the new ones warmed up
    worst = max(r.done - r.sent for r in results)
    print(f"\nreload under load: {len(results)} requests; from publishing version 2: first answer from 2 "
          f"after {first_two - published:.2f} s, last answer from 1 after {last_one - published:.2f} s, "
          f"rollover done after {switched - published:.2f} s; max latency {worst:.2f} s")
    assert worst < warmup_s + 10  # no request waited for a whole rollover
    assert "rolling over to version 2: worker 2 ready (1/2), stopping worker" in server.output
    beat = heartbeat(redis_server, server)
    assert revision_version(beat.revisions["/api/versioned"]) == "2"
    assert (beat.rollout, beat.reload_error) == ("", "")
    stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    wait_until(lambda: len(redis_server.client().xinfo_consumers(stream, CONSUMER_GROUP)) == 2, 30,
               "the retired workers' consumers to be removed")

    publish(base, 3, "three", **{"broken.txt": ""})
    refusal = "version 3 refused: RuntimeError: version 3 is broken"
    server.wait_for_output(refusal, 60)
    wait_until(lambda: heartbeat(redis_server, server).reload_error == refusal, 30, "the heartbeat to say why")
    api = Client(url, APP_ID, APP_SECRET, sign_type="SHA256")
    for _ in range(4):
        assert api.call("/api/versioned", {})["version"] == 2
    time.sleep(2.0)  # four polls: a refused version is not tried again and again
    assert server.output.count(refusal) == 1
    assert server.process.poll() is None
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'goinfer_dispatcher_reload_failures_total{queue_index="0"} 1.0' in metrics
    assert re.search(r'goinfer_dispatcher_model_version\{api_path="/api/versioned",queue_index="0",'
                     r'revision="2:[^"]+"\} 2\.0', metrics), metrics


LIVE_MODEL = '''
import os
from goinfer import Model

class LiveCode(Model):
    api_path = "/api/live"

    def init(self):
        pass

    def api_entry(self, data):
        return data

    def infer(self, request_id, params):
        return {{"text": {text!r}, "pid": os.getpid()}}
'''


def test_sighup_and_goinfer_reload_roll_the_workers_over_to_new_code(tmp_path, redis_server, processes):
    code = tmp_path / "live" / "livecode.py"
    code.parent.mkdir()
    code.write_text(LIVE_MODEL.format(text="first"))
    processes.python_path.append(str(code.parent))
    settings = write_settings(tmp_path, redis_server.address, Models=["livecode:LiveCode"],
                              Server={"MaxWorkers": 2, "ModelPollS": 0.5})
    processes.http(settings)
    server = processes.server(settings)
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")
    first_pids = worker_pids(server)
    assert len(first_pids) == 2
    first_revision = heartbeat(redis_server, server).revisions["/api/live"]

    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_output("rolled over for a reload: all 2 workers replaced", 60)
    assert api.call("/api/live", {})["text"] == "first"
    second_pids = worker_pids(server)
    assert len(second_pids) == 2 and not second_pids & first_pids

    code.write_text(LIVE_MODEL.format(text="second"))
    reload = processes.start("reload", "--yaml", str(settings))
    assert reload.process.wait(30) == 0, reload.output
    assert "requested" in reload.output
    wait_until(lambda: server.output.count("rolled over for a reload: all 2 workers replaced") == 2, 60,
               "the reload to be rolled out")
    answer = api.call("/api/live", {})
    assert answer["text"] == "second"
    assert answer["pid"] not in first_pids | second_pids
    assert not worker_pids(server) & second_pids
    revision = heartbeat(redis_server, server).revisions["/api/live"]
    assert revision != first_revision and revision.startswith("-:")
    assert server.process.poll() is None


def test_a_pinned_version_is_not_rolled_over_when_a_newer_one_appears(tmp_path, redis_server, processes):
    base = tmp_path / "models"
    publish(base, 1, "one")
    settings = write_settings(tmp_path, redis_server.address,
                              Models=[{"Class": VERSIONED, "ModelBasePath": str(base), "ModelVersion": 1}],
                              Server={"ModelPollS": 0.3})
    processes.http(settings)
    server = processes.server(settings)
    publish(base, 2, "two")
    time.sleep(2.0)  # several polls
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")
    assert api.call("/api/versioned", {})["version"] == 1
    assert "rolling over" not in server.output


def test_a_stop_during_a_rollover_stops_every_worker_cleanly(tmp_path, redis_server, processes):
    base = tmp_path / "models"
    publish(base, 1, "one")
    settings = write_settings(tmp_path, redis_server.address,
                              Models=[{"Class": VERSIONED, "ModelBasePath": str(base)}],
                              Server={"MaxWorkers": 2, "ModelPollS": 0.3})
    server = processes.server(settings)
    publish(base, 2, "two", **{"warmup.txt": "30"})  # the new worker is still warming up when the stop comes
    server.wait_for_output("rolling over to version 2: starting worker 2", 30)
    wait_until(lambda: len(worker_pids(server)) == 3, 30, "the new worker to start beside the old ones")
    workers = worker_pids(server)
    assert server.stop(timeout=60) == 0
    assert "dispatcher for queue 0 stopped" in server.output
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 10, "every worker to be gone")


def test_a_version_that_fails_halfway_through_a_rollover_is_rolled_back(tmp_path, redis_server, processes):
    base = tmp_path / "models"
    publish(base, 1, "one")
    settings = write_settings(tmp_path, redis_server.address,
                              Models=[{"Class": "sample_models:LoadsOnce", "ModelBasePath": str(base)}],
                              Server={"MaxWorkers": 2, "ModelPollS": 0.3})
    processes.http(settings)
    server = processes.server(settings)
    publish(base, 2, "two", **{"once.txt": ""})
    refusal = "version 2 refused: RuntimeError: version 2 loads only once"
    server.wait_for_output(refusal, 60)
    server.wait_for_output("rolled back to version 1", 60)
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")
    assert {api.call("/api/loads-once", {})["version"] for _ in range(8)} == {1}
    beat = heartbeat(redis_server, server)
    assert beat.reload_error == refusal
    assert revision_version(beat.revisions["/api/loads-once"]) == "1"
    assert len(worker_pids(server)) == 2
    time.sleep(1.5)  # polls: the refused version is not tried again
    assert server.output.count(refusal) == 1
