"""Model versions: TF Serving's <base>/<number>/ folders, and the version each answer was computed by."""

from __future__ import annotations

from pathlib import Path

from goinfer.client import Client

from conftest import APP_ID, APP_SECRET, url_of, write_settings

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
