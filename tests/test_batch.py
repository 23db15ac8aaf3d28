"""`goinfer batch`: rows of a file through real dispatchers, resumable after a kill, errors as rows."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

from goinfer.queue import PRIORITY_LOW, lane_stream, stream_name

from conftest import settings_of, wait_until, write_settings

MODELS = ["goinfer.models.echo:Echo", "sample_models:Greeter", "sample_models:Doubler"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def output_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch(processes, settings: Path, *args: str, env: dict[str, str] | None = None):
    return processes.start("batch", *args, "--yaml", str(settings), log_name="batch", env=env)


def finish(proc, timeout: float = 120) -> int:
    proc.process.wait(timeout)
    return proc.process.returncode


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_a_run_killed_halfway_resumes_and_writes_every_row_once(tmp_path, redis_server, processes):
    total = 10_000
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS,
                              Server={"MaxWorkers": 2, "RequestQueueAmount": 2})
    processes.server(settings, 0)
    processes.server(settings, 1)
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "data": {"x": i}} for i in range(total)])
    output = tmp_path / "out.jsonl"
    args = (str(source), "--api", "/api/double", "--output", str(output), "--concurrency", "32")

    first = batch(processes, settings, *args)
    wait_until(lambda: complete_lines(output) >= total // 2 or first.process.poll() is not None, 120,
               "half of the rows in the output")
    os.killpg(first.pid, signal.SIGKILL)
    first.process.wait()
    written = complete_lines(output)
    assert first.process.returncode == -signal.SIGKILL and 0 < written < total, (written, first.output)
    with open(output, "ab") as handle:  # as if the kill had landed in the middle of a write
        handle.write(b'{"row":')

    second = batch(processes, settings, *args)
    assert finish(second) == 0, second.output
    rows = output_rows(output)
    assert [row["row"] for row in rows] == list(range(1, total + 1))
    assert all(row["id"] == f"r{i}" and row["result"] == {"double": 2 * i} for i, row in enumerate(rows))
    assert f"rows {total}: {total} in the output ({written} from before, {total - written} now), 0 errors" \
        in second.output
    assert "rows/s" in second.output and "p99" in second.output and "row/s" in second.output  # summary, bar


def test_error_rows_go_to_the_output_and_the_run_completes(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS)
    processes.server(settings)
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "ok", "data": {"x": 1}},
        {"id": "refused", "data": {"x": 2, "refuse": True}},  # ApiError in api_entry
        {"id": "broken", "data": {"x": "nan?"}},  # any other exception in api_entry
        {"id": "fails", "data": {"x": 3, "fail": True}},  # ApiError in infer
        "{not json",
        {"id": "notobject", "data": [1, 2]},
        "",  # blank lines are not rows
        {"x": 7, "id": "whole"},  # no `data`: the object is the data
    ])
    output, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    proc = batch(processes, settings, str(source), "--api", "/api/double", "--output", str(output))
    assert finish(proc) == 0, proc.output
    rows = output_rows(output)
    assert [row["id"] for row in rows] == ["ok", "refused", "broken", "fails", None, "notobject", "whole"]
    assert rows[0]["result"] == {"double": 2} and rows[6]["result"] == {"double": 14}
    assert rows[1]["error"] == {"code": 4100, "msg": "api entry fail : refused at entry", "attempts": 1}
    assert rows[2]["error"]["code"] == 9701 and "nan?" in rows[2]["error"]["msg"]
    assert rows[3]["error"]["code"] == 4200 and "asked to fail" in rows[3]["error"]["msg"]
    assert rows[4]["error"]["code"] == 9701 and "line 5 is not valid JSON" in rows[4]["error"]["msg"]
    assert rows[5]["error"]["code"] == 9701 and "data is not an object" in rows[5]["error"]["msg"]
    assert "rows 7: 7 in the output (0 from before, 7 now), 5 errors" in proc.output

    split = batch(processes, settings, str(source), "--api", "/api/double", "--output", str(tmp_path / "ok.jsonl"),
                  "--errors", str(errors))
    assert finish(split) == 0, split.output
    assert [row["row"] for row in output_rows(tmp_path / "ok.jsonl")] == [1, 7]
    assert [row["row"] for row in output_rows(errors)] == [2, 3, 4, 5, 6]


def test_a_row_that_keeps_failing_transiently_is_tried_retries_plus_one_times(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS)  # no dispatcher: never answered
    source = write_jsonl(tmp_path / "in.jsonl", [{"data": {"x": i}} for i in range(3)])
    output = tmp_path / "out.jsonl"
    proc = batch(processes, settings, str(source), "--api", "/api/double", "--output", str(output),
                 "--timeout", "0.5", "--retries", "2", "--no-progress")
    assert finish(proc) == 0, proc.output
    rows = output_rows(output)
    assert [row["error"]["code"] for row in rows] == [9997] * 3
    assert [row["error"]["attempts"] for row in rows] == [3] * 3
    lane = lane_stream(stream_name(settings_of(settings)["Server"]["QueueName"], 0), PRIORITY_LOW)
    assert redis_server.client().xlen(lane) == 9  # each row queued once per attempt, and no more
    assert "3 errors, 6 retries" in proc.output


def test_url_mode_sends_signed_requests_through_the_http_tier(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS)
    processes.http(settings)
    processes.server(settings)
    names = [f"n{i}" for i in range(20)]
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "data": {"name": n}} for i, n in enumerate(names)]
                         + [{"id": "anonymous", "data": {}}])
    output = tmp_path / "out.jsonl"
    url = f"http://127.0.0.1:{settings_of(settings)['API']['Port']}"
    proc = batch(processes, settings, str(source), "--api", "/api/greet", "--output", str(output), "--url", url,
                 "--concurrency", "8")
    assert finish(proc) == 0, proc.output
    rows = output_rows(output)
    assert [row["result"] for row in rows[:-1]] == [{"greeting": f"hello, {n}", "tag": ""} for n in names]
    assert rows[-1]["error"] == {"code": 1001, "msg": "api entry fail : need name", "attempts": 1}


def test_csv_input(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS)
    processes.server(settings)
    source = tmp_path / "in.csv"
    with open(source, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "name"])
        writer.writerows([["a", "Ann"], ["b", "Bo, Jr."], ["c", "line\nbreak"]])
    output = tmp_path / "out.jsonl"
    proc = batch(processes, settings, str(source), "--api", "/api/greet", "--output", str(output))
    assert finish(proc) == 0, proc.output
    assert [(row["id"], row["result"]["greeting"]) for row in output_rows(output)] == \
        [("a", "hello, Ann"), ("b", "hello, Bo, Jr."), ("c", "hello, line\nbreak")]


def test_parquet_input(tmp_path, redis_server, processes):
    import pyarrow  # the test extra installs it
    import pyarrow.parquet as parquet

    settings = write_settings(tmp_path, redis_server.address, Models=MODELS)
    processes.server(settings)
    source = tmp_path / "in.parquet"
    parquet.write_table(pyarrow.table({"id": [10, 11, 12], "x": [1, 2, 3]}), source)
    output = tmp_path / "out.jsonl"
    proc = batch(processes, settings, str(source), "--api", "/api/double", "--output", str(output))
    assert finish(proc) == 0, proc.output
    assert [(row["id"], row["result"]) for row in output_rows(output)] == \
        [(10, {"double": 2}), (11, {"double": 4}), (12, {"double": 6})]


def test_usage_problems_are_one_line_and_exit_2(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS)
    processes.server(settings)
    source = write_jsonl(tmp_path / "in.jsonl", [{"data": {"x": 1}}])
    output = tmp_path / "out.jsonl"
    done = batch(processes, settings, str(source), "--api", "/api/double", "--output", str(output))
    assert finish(done) == 0, done.output

    def refused(*args: str, env: dict[str, str] | None = None) -> str:
        proc = batch(processes, settings, *args, env=env)
        assert finish(proc) == 2, proc.output
        assert "Traceback" not in proc.output and proc.output.count("\n") == 1, proc.output
        return proc.output

    assert "other arguments (api differ" in refused(str(source), "--api", "/api/echo", "--output", str(output))
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("{}\n")
    assert "not the output of a goinfer batch run" in refused(str(source), "--api", "/api/double",
                                                             "--output", str(foreign))
    assert "no model serves /api/nope" in refused(str(source), "--api", "/api/nope", "--output",
                                                   str(tmp_path / "x.jsonl"))
    assert "no such file" in refused(str(tmp_path / "missing.jsonl"), "--api", "/api/double", "--output",
                                     str(tmp_path / "y.jsonl"))
    # Parquet without pyarrow: hidden from the batch process by a package of that name that fails
    hidden = tmp_path / "without-pyarrow" / "pyarrow"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named pyarrow')\n")
    parquet = tmp_path / "in.parquet"
    parquet.write_bytes(b"PAR1")
    assert "needs pyarrow" in refused(str(parquet), "--api", "/api/double", "--output", str(tmp_path / "z.jsonl"),
                                      env={"PYTHONPATH": str(hidden.parent)})
    # The run that was refused left the first output as it was.
    assert [row["result"] for row in output_rows(output)] == [{"double": 2}]
