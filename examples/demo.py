"""The main job in one command: serve a model with `goinfer up`, answer one signed request, stop.

    python -m examples.demo                 # the built-in echo model
    python -m examples.demo --embedding     # the all-MiniLM-L6-v2 example (needs goinfer[tf])

It starts the service exactly as a user would (a private Redis if none runs, the dispatcher,
the HTTP tier), sends an SM2-signed request with goinfer's client, prints the answer, and
stops everything with SIGTERM.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request

import click

from goinfer.client import Client
from goinfer.settings import load_settings

ECHO = {"command": [sys.executable, "-m", "goinfer"], "yaml": "config/settings.yaml",
        "path": "/api/echo", "data": {"text": "测试测试", "n": 1}}
EMBEDDING = {"command": [sys.executable, "-m", "examples.embedding.main"],
             "yaml": "examples/embedding/settings.yaml", "path": "/api/embedding",
             "data": {"text": "A man is playing a guitar on stage."}}


def wait_for_service(client: Client, ready_url: str, path: str, data: dict, timeout: float) -> dict:
    """The answer to one request, sent once the service is ready: the HTTP tier answers /ready
    with 200 only when a dispatcher serves the queue. A request sent while the models still load
    (12 s for the embedding's first load on a fresh machine) would wait in the queue and could
    outlive its MessageTimeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(ready_url, timeout=5) as response:
                if response.status == 200:
                    return client.call(path, data)
        except OSError:  # not listening yet, or 503 (urllib's HTTPError) while it loads
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service was not ready within {timeout:g} s ({ready_url})")
        time.sleep(0.5)


@click.command()
@click.option("--embedding", is_flag=True, help="Serve the embedding example instead of echo.")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for the service.")
def main(embedding: bool, timeout: float) -> None:
    job = EMBEDDING if embedding else ECHO
    settings = load_settings(job["yaml"])
    api = settings.api
    app_id, secret = next(iter(api.app_id_secret.items()))
    client = Client(f"http://127.0.0.1:{api.port}", app_id, secret, sign_type="SM2",
                    sm2_private_key=api.sm2_private_key, timeout=60)
    service = subprocess.Popen(job["command"] + ["up", "--yaml", job["yaml"]], env=dict(os.environ))
    try:
        click.echo(f"request  {job['path']} {json.dumps(job['data'], ensure_ascii=False)}", err=True)
        data = wait_for_service(client, f"http://127.0.0.1:{api.port}/ready", job["path"], job["data"], timeout)
        if "embeddings" in data:
            vector = data["embeddings"]
            norm = math.sqrt(sum(v * v for v in vector))
            click.echo(f"answer   {len(vector)} floats, first {vector[:4]}, norm {norm:.6f}")
        else:
            click.echo(f"answer   {json.dumps(data, ensure_ascii=False)}")
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)


if __name__ == "__main__":
    main()
