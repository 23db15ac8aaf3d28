"""The benchmark suite: rounds and their medians, CPU split by process kind, the targets table,
the embedding ceiling. Figures are never asserted (the machine's load decides them), only that
each is measured, kept per round, and compared with the right reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import against_base, ceiling, reference, run
from benchmarks.models import Sleep10ms
from benchmarks.run import CeilingRound, Point

ROOT = Path(__file__).resolve().parents[1]


def point(scenario: str, connections: int, rps: float, round_number: int = 1, *, p50: float = 1.0,
          p99: float = 2.0, cpu: float = 0.5) -> Point:
    return Point(scenario, connections, rps, p50, p99, 100, 0, "", cpu,
                 {"http": cpu / 2, "dispatcher": 0.0, "workers": cpu / 4, "redis": cpu / 4}, cpu / 10,
                 round=round_number)


def test_medians_are_taken_per_column_over_the_rounds() -> None:
    rounds = [point("echo-sha256", 64, 100, 1, p50=9, cpu=0.3), point("echo-sha256", 64, 300, 2, p50=1, cpu=0.9),
              point("echo-sha256", 64, 200, 3, p50=5, cpu=0.6), point("echo-sm2", 64, 50, 1)]
    medians = {(p.scenario, p.connections): p for p in run.median_points(rounds)}
    sha = medians["echo-sha256", 64]
    assert (sha.rps, sha.p50_ms, sha.cpu_ms, sha.cpu_split["http"], sha.load_cpu_ms) == (200, 5, 0.6, 0.3, 0.06)
    assert sha.requests == 300 and sha.round == 3  # all rounds' requests; round holds how many rounds
    assert medians["echo-sm2", 64].rps == 50


def test_only_selects_by_name_or_prefix() -> None:
    class Args:
        only = {"embedding-short", "echo"}

    assert run.selected(Args, "echo-sha256") and run.selected(Args, "echo-sm2")
    assert run.selected(Args, "embedding-short-batch-on") and not run.selected(Args, "embedding-long-batch-on")
    assert not run.selected(Args, "embedding-ceiling") and not run.selected(Args, "echo2")
    Args.only = set()
    assert run.selected(Args, "anything")


def by_key(points: list[Point]) -> dict[tuple[str, int], Point]:
    return {(p.scenario, p.connections): p for p in points}


def verdicts(targets: list[reference.Target]) -> dict[str, bool | None]:
    return {t.name: t.met for t in targets}


def test_targets_compare_with_go_infer_and_the_issue_thresholds() -> None:
    points = by_key([
        point("echo-sha256", 64, 4300, cpu=0.31), point("echo-sha256", 256, 4500, cpu=0.20),
        point("echo-sha256", 1, 900, p50=0.69),
        point("echo-sm2", 16, 1853), point("echo-sm2", 64, 1900), point("echo-sm2", 256, 1855),
        point("sleep-10ms", 64, 780, cpu=0.54),
    ])
    got = verdicts(reference.evaluate_targets(points, {"served": 500, "p99_ms": 200, "ceiling": 600, "batch": 32,
                                                       "ratio": 0.84, "cpu_ratio": 0.9}))
    assert got == {
        "SHA256 echo, 64 conns: req/s ≥ go-infer": True,  # 4300 ≥ 4285
        "SHA256 echo, 64 conns: CPU/request ≤ go-infer": False,  # 0.31 > 0.30
        "SHA256 echo, 256 conns: req/s ≥ go-infer": False,  # 4500 < 4602
        "SHA256 echo, 256 conns: CPU/request ≤ go-infer": True,
        "SM2 echo, 16 conns: req/s ≥ 2x go-infer": False,  # 1853 < 2 x 927
        "SM2 echo, 64 conns: req/s ≥ 2x go-infer": True,
        "SM2 echo, 256 conns: req/s ≥ 2x go-infer": True,
        "SHA256 echo, 1 conn: p50 ≤ 0.7 ms": True,
        "10 ms model, MaxWorkers 8, 64 conns: req/s ≥ 776": True,
        "10 ms model: framework CPU/request ≤ go-infer": False,  # 0.54 > 0.53
        "embedding, short texts, 64 conns, batching on: ≥ 85% of the in-process ceiling": False,
    }
    sleep = {t.name: t.measured for t in reference.evaluate_targets(points, None)}
    assert sleep["10 ms model, MaxWorkers 8, 64 conns: req/s ≥ 776"] == "780 req/s"
    assert sleep["10 ms model: framework CPU/request ≤ go-infer"] == "0.54 ms (the model only sleeps)"
    points["sleep-10ms-alone", 8] = point("sleep-10ms-alone", 8, 784, cpu=0.04)
    sleep = {t.name: t.measured for t in reference.evaluate_targets(points, None)}
    assert sleep["10 ms model, MaxWorkers 8, 64 conns: req/s ≥ 776"] == "780 req/s = 0.995 of the model alone, 784"
    assert sleep["10 ms model: framework CPU/request ≤ go-infer"] == \
        "0.54 ms (the model only sleeps; the sleep itself costs 0.04, measured alone)"
    missing = verdicts(reference.evaluate_targets({}, None))
    assert set(missing.values()) == {None}, "a target whose point did not run is neither met nor missed"


def test_the_take_ahead_point_is_set_beside_the_default_one() -> None:
    """Not a target: a sentence after the table, with both points' figures from the same run."""
    points = by_key([point("sleep-10ms", 64, 746, p50=83.6, cpu=1.62)])
    assert reference.take_ahead_note(points, 25) is None
    points["sleep-10ms-take-ahead", 64] = point("sleep-10ms-take-ahead", 64, 758, p50=83.3, cpu=1.22)
    note = reference.take_ahead_note(points, 25)
    assert note is not None and "TakeAheadMs 25" in note
    assert "758 req/s for 1.22 ms of CPU per request, p50 83.3 ms, against 746 req/s, 1.62 ms and p50 83.6 ms" \
        in note

    class Args:
        only = {"sleep-10ms"}

    assert all(run.selected(Args, name) for name in run.SLEEP_POINTS)


def test_the_busy_poll_point_is_set_beside_the_default_one() -> None:
    """Not a target either: each connection level both points ran at, from the same run."""
    points = by_key([point("echo-sha256", 1, 1312, p50=0.74, cpu=0.83),
                     point("echo-sha256", 64, 7687, p50=8.17, cpu=0.20)])
    assert reference.busy_poll_note(points, 500) is None
    points["echo-sha256-busy-poll", 1] = point("echo-sha256-busy-poll", 1, 1636, p50=0.58, cpu=0.92)
    note = reference.busy_poll_note(points, 500)
    assert note is not None and "BusyPollUs 500" in note and "64 connections" not in note
    assert "at 1 connection, p50 0.58 ms, 1,636 req/s for 0.92 ms of CPU per request against 0.74 ms, " \
        "1,312 req/s and 0.83 ms with the defaults" in note
    points["echo-sha256-busy-poll", 64] = point("echo-sha256-busy-poll", 64, 7491, p50=8.40, cpu=0.21)
    assert "at 64 connections, p50 8.40 ms, 7,491 req/s" in (reference.busy_poll_note(points, 500) or "")

    class Args:
        only = {"echo-sha256"}

    assert run.selected(Args, "echo-sha256-busy-poll") and not run.selected(Args, "echo-sm2")


def test_served_over_ceiling_is_the_median_of_each_rounds_ratio() -> None:
    def ceilings(round_number: int, rates: dict[int, float]) -> CeilingRound:
        return CeilingRound(round_number, [ceiling.Ceiling(batch, rate, 10.0, 3.0) for batch, rate in rates.items()])

    served = [point("embedding-short-batch-on", 64, rps, n, cpu=3.5) for n, rps in ((1, 300), (2, 450), (3, 400))]
    # Batch 64 is above the served BatchSize: the served workers cannot reach it.
    size = run.EMBEDDING_BATCHING["on"]
    assert 8 < size < 64
    rounds = [ceilings(1, {8: 400, size: 500, 64: 900}), ceilings(2, {8: 500, size: 450}),
              ceilings(3, {8: 380, size: 800})]
    ratio = run.embedding_ratio(served, rounds)
    assert ratio is not None
    assert ratio["rounds"] == [300 / 500, 450 / 500, 400 / 800]
    assert ratio["ratio"] == 0.6 and ratio["batch"] == size and ratio["served"] == 400
    assert ratio["framework_cpu_ms"] == pytest.approx(0.5) and ratio["cpu_ratio"] == pytest.approx(3.0 / 3.5)
    assert run.embedding_ratio(served, []) is None


def test_a_short_run_keeps_every_round_and_splits_the_cpu(tmp_path: Path) -> None:
    """Two rounds of the SHA256 echo at 1 connection (with and without BusyPollUs), through the
    command line."""
    out, report = tmp_path / "results.json", tmp_path / "results.md"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--duration", "1", "--rounds", "2", "--only", "echo-sha256",
         "--connections", "1", "--json", str(out), "--output", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(p["scenario"], p["connections"], p["round"]) for p in data["rounds"]] == \
        [("echo-sha256", 1, 1), ("echo-sha256-busy-poll", 1, 1), ("echo-sha256", 1, 2),
         ("echo-sha256-busy-poll", 1, 2)]
    for measured in data["rounds"]:
        assert measured["requests"] > 0 and measured["errors"] == 0
        split = measured["cpu_split"]
        assert set(split) == {"http", "dispatcher", "workers", "redis"}
        assert split["http"] > 0 and split["workers"] > 0 and split["redis"] > 0, measured
        assert sum(split.values()) == pytest.approx(measured["cpu_ms"])
        assert measured["load_cpu_ms"] > 0  # measured, and kept out of cpu_ms
        assert set(measured["sleeps"]) == set(split)
        if measured["scenario"] == "echo-sha256":
            # One connection, nobody polling: each process waits for every request's next step.
            assert min(measured["sleeps"][kind] for kind in ("http", "workers", "redis")) >= 0.5, measured
    median, _ = data["medians"]
    assert set(median["sleeps"]) == set(median["cpu_split"])
    assert median["scenario"] == "echo-sha256" and median["round"] == 2
    assert median["requests"] == sum(p["requests"] for p in data["rounds"] if p["scenario"] == "echo-sha256")
    targets = {t["name"]: t for t in data["targets"]}
    assert targets["SHA256 echo, 1 conn: p50 ≤ 0.7 ms"]["met"] is not None
    assert targets["SHA256 echo, 64 conns: req/s ≥ go-infer"]["met"] is None
    text = report.read_text()
    assert "| target | measured (median) | reference | verdict |" in text and "## Every round" in text
    assert "sleeps/req (HTTP / workers / Redis) |" in text
    assert "not run" in result.stdout
    assert "SHA256 echo with BusyPollUs 500" in text


def test_help_names_every_option() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--duration", "--rounds", "--connections", "--only", "--json", "--output",
                   "--embedding-connections", "--ceiling-batches", "--ceiling-seconds"):
        assert option in result.stdout


def test_an_unknown_scenario_is_refused() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "echo-sha512"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "echo-sha512" in result.stderr and "Traceback" not in result.stderr


def test_the_ceiling_runs_the_served_layout_in_process() -> None:
    from testdata import require_embedding_stack

    require_embedding_stack()
    measured = ceiling.measure(run.SHORT_TEXT, [1, 4], 0.3, processes=2, threads=1)
    assert [c.batch for c in measured] == [1, 4]
    for c in measured:
        assert c.sentences_s > 0 and c.call_ms > 0 and c.cpu_ms_per_sentence > 0


def test_the_model_alone_is_timed_call_by_call() -> None:
    """The 10 ms model's own limit: 4 threads for 0.3 s make about 4 x 30 calls of at least 10 ms."""
    alone = run.model_alone(Sleep10ms(), {"n": 1}, callers=4, duration=0.3)
    assert (alone.scenario, alone.connections) == ("sleep-10ms-alone", 4)
    assert 4 * 20 <= alone.requests <= 4 * 31 and alone.errors == 0
    assert 10.0 <= alone.p50_ms <= alone.p99_ms
    assert alone.rps <= 4 * 100  # never faster than the sleep allows
    assert 0 < alone.cpu_ms < 5  # the sleeps' own CPU: far below the time they last


def test_the_wakeup_costs_are_measured_against_a_real_redis() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.wakeups", "--messages", "50"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("both block" in line for line in lines) and any("both busy-poll" in line for line in lines)
    assert sum("PING to redis-server" in line and "client CPU" in line for line in lines) == 2, result.stdout


def test_go_infer_s_figures_scale_as_the_base_tree_s_moved() -> None:
    """Where the base tree runs as it did on the issue's machine, the references are go-infer's
    own; where it runs twice as fast and at half the CPU, go-infer's figures move as much."""
    same = {key: point(ref.scenario, ref.connections, ref.rps, p50=ref.p50_ms or 1.0, cpu=ref.cpu_ms)
            for key, ref in reference.BASE.items()}
    scaled, echo_p50 = reference.scaled_reference(same)
    assert scaled == reference.GOINFER and echo_p50 == pytest.approx(reference.ECHO_P50_MS)
    faster = {key: point(ref.scenario, ref.connections, 2 * ref.rps, p50=(ref.p50_ms or 1.0) / 2, cpu=ref.cpu_ms / 2)
              for key, ref in reference.BASE.items() if key != ("echo-sm2", 64)}
    scaled, echo_p50 = reference.scaled_reference(faster)
    for key, ref in reference.GOINFER.items():
        factor = 1.0 if key == ("echo-sm2", 64) else 2.0  # a point the base did not run keeps its figure
        assert scaled[key].rps == pytest.approx(factor * ref.rps)
        assert scaled[key].cpu_ms == pytest.approx(ref.cpu_ms / factor)
    assert echo_p50 == pytest.approx(reference.ECHO_P50_MS / 2)
    targets = verdicts(reference.evaluate_targets(
        by_key([point("echo-sha256", 64, 6000, cpu=0.1), point("echo-sha256", 1, 400, p50=0.5)]),
        None, scaled, echo_p50))
    assert targets["SHA256 echo, 64 conns: req/s ≥ go-infer"] is False  # 6,000 < 2 x 4,285
    assert targets["SHA256 echo, 64 conns: CPU/request ≤ go-infer"] is True  # 0.1 ≤ 0.30 / 2
    assert targets["SHA256 echo, 1 conn: p50 ≤ 0.35 ms"] is False


def test_the_comparison_with_the_base_tree_sets_each_point_beside_its_base() -> None:
    base = [point("echo-sha256", 64, 3300, 1, p50=20.0, cpu=0.56), point("echo-sha256", 64, 3340, 2, cpu=0.58)]
    this = [point("echo-sha256", 64, 7600, 1, p50=8.0, cpu=0.20), point("echo-sha256", 64, 7800, 2, cpu=0.20)]
    text = against_base.report(base, this)
    assert "| echo-sha256, 64 conns | 3,320 | 7,700 | 2.32 | 0.57 | 0.20 | 0.35 |" in text  # medians
    assert "echo-sha256 at 64: 0.99x req/s, 1.21x CPU" in text  # the base here against its issue figure
    assert "| SHA256 echo, 64 conns: req/s ≥ go-infer | 7,700 req/s (1.81x) | 4,256 req/s | met |" in text
    assert "embedding" not in text  # not run: not in the table


def test_against_base_has_help() -> None:
    result = subprocess.run([sys.executable, "-m", "benchmarks.against_base", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--base" in result.stdout and reference.BASE_COMMIT in result.stdout
