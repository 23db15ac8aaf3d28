"""Readiness of a dispatcher pod: every worker of `goinfer server N` has its models loaded.

Usage: python /etc/goinfer/dispatcher-ready.py PORT   (PORT = Server.MetricsPort + N)

Reads the dispatcher's own /metrics on this pod: ready when goinfer_dispatcher_live_workers has
reached goinfer_dispatcher_max_workers, the moment the dispatcher writes its heartbeat. Without it
a rolling update would stop the old pod as soon as the new one's container started, and while the
new workers load the model no dispatcher would serve the queue: every HTTP pod's /ready would
turn 503 and the Service would lose all its endpoints. Exit status 0: ready; 1: not (yet).
"""

import sys
import urllib.request


def main() -> int:
    port = int(sys.argv[1])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as answer:
            text = answer.read().decode("utf-8", "replace")
    except OSError as exc:
        print(f"dispatcher metrics on port {port} do not answer: {exc}")
        return 1
    values = {}
    for line in text.splitlines():
        if line.startswith(("goinfer_dispatcher_live_workers", "goinfer_dispatcher_max_workers")):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            values[name] = float(line.rsplit(" ", 1)[1])
    live = values.get("goinfer_dispatcher_live_workers", 0.0)
    wanted = values.get("goinfer_dispatcher_max_workers", 0.0)
    if wanted < 1 or live < wanted:
        print(f"{live:.0f} of {wanted:.0f} workers ready")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
