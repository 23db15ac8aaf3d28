"""A dispatcher's workers: warmed up before they serve, loading said while they load, placed on devices."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

from test_model_versions import heartbeat, worker_pids

from goinfer.client import Client

from conftest import APP_ID, APP_SECRET, url_of, wait_until, write_settings


def client(settings: Path) -> Client:
    return Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process started with (exact, unlike sampling answers from each worker)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def placements(server, name: str = "CUDA_VISIBLE_DEVICES") -> Counter[str | None]:
    return Counter(environ_of(pid).get(name) for pid in worker_pids(server))


def test_warm_up_runs_the_class_and_settings_params_before_the_first_request(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Server={"MaxWorkers": 1},
                              Models=[{"Class": "sample_models:WarmupCounter", "Warmup": [{"text": "from settings"}]}])
    processes.http(settings)
    processes.server(settings)
    answer = client(settings).call("/api/warm-count", {"text": "real"})
    assert answer["warm_calls"] == [{"text": "from the class"}, {"text": "from settings"}]


def test_a_failing_warm_up_stops_the_dispatcher_like_a_failing_init(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Server={"MaxWorkers": 1},
                              Models=["sample_models:FailingWarmup"])
    server = processes.server(settings, wait=False)
    assert server.process.wait(60) == 1
    output = server.output
    assert "dispatcher stopping: worker 0 could not initialise the models: RuntimeError: warm-up failed: " \
           "no GPU here" in output
    assert output.count("Traceback") <= 1  # the worker's one logged traceback, nothing more
    assert "ready" not in output


def test_loading_is_said_in_the_log_and_the_heartbeat_until_the_models_are_loaded(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Server={"MaxWorkers": 2, "HeartbeatIntervalS": 1},
                              Models=["sample_models:SlowInit"])
    server = processes.server(settings, wait=False, env={"SLOW_INIT_S": "4"})
    server.wait_for_output("loading: 0/2 workers ready", 30)
    beat = wait_until(lambda: _loading(redis_server, server), 10, "a loading heartbeat")
    assert beat.state == "loading" and beat.loading_s > 0 and not beat.serving
    server.wait_for_output("dispatcher for queue 0 ready", 60)
    wait_until(lambda: heartbeat(redis_server, server).state == "serving", 10, "a serving heartbeat")
    assert heartbeat(redis_server, server).serving


def _loading(redis_server, server):
    try:
        beat = heartbeat(redis_server, server)
    except AssertionError:
        return None
    return beat if beat.state == "loading" else None


def test_workers_are_spread_over_the_gpus_and_keep_their_gpu_through_a_rollover(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Server={"MaxWorkers": 4, "Devices": [0, 1]},
                              Models=["sample_models:Placement"])
    processes.http(settings)
    server = processes.server(settings)
    assert placements(server) == Counter({"0": 2, "1": 2})
    assert placements(server, "TF_FORCE_GPU_ALLOW_GROWTH") == Counter({"true": 4})
    answer = client(settings).call("/api/placement", {})
    assert answer["cuda"] in ("0", "1") and answer["growth"] == "true"
    assert heartbeat(redis_server, server).devices == ("0", "1", "0", "1")
    assert "reading" in server.output and " on device 0" in server.output and " on device 1" in server.output
    before = worker_pids(server)

    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_output("rolled over for a reload: all 4 workers replaced", 120)
    assert not worker_pids(server) & before
    assert placements(server) == Counter({"0": 2, "1": 2})


def test_cpu_hides_every_gpu_and_no_devices_leaves_the_environment_alone(tmp_path, redis_server, processes):
    (tmp_path / "cpu").mkdir()
    cpu = write_settings(tmp_path / "cpu", redis_server.address, Server={"MaxWorkers": 2, "Devices": "cpu"},
                         Models=["sample_models:Placement"])
    cpu_server = processes.server(cpu, env={"CUDA_VISIBLE_DEVICES": "7"})
    assert placements(cpu_server) == Counter({"-1": 2})
    assert placements(cpu_server, "TF_FORCE_GPU_ALLOW_GROWTH") == Counter({None: 2})
    assert heartbeat(redis_server, cpu_server).devices == ("cpu", "cpu")

    plain = write_settings(tmp_path, redis_server.address, Server={"MaxWorkers": 2},
                           Models=["sample_models:Placement"])
    plain_server = processes.server(plain, env={"CUDA_VISIBLE_DEVICES": "7"})
    assert placements(plain_server) == Counter({"7": 2})
    assert placements(plain_server, "TF_FORCE_GPU_ALLOW_GROWTH") == Counter({None: 2})
    assert heartbeat(redis_server, plain_server).devices == ()
    assert " on device" not in plain_server.output
