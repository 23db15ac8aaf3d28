"""The embedding encoder's own speed, in-process, laid out as the served scenario lays out its workers.

    python -m benchmarks.ceiling                          # 2 processes x 1 thread, batches 1,8,16,32,64
    python -m benchmarks.ceiling --processes 1 --batches 32 --seconds 5

The served embedding scenario (benchmarks/run.py) runs the encoder in `MaxWorkers` worker processes
with `EmbeddingThreads` TensorFlow threads each. Its ceiling is the same encoder
(`SentenceEncoder.load()`, as the example's `init` loads it) in as many processes with as many
threads, on the same cores, encoding the same short text at a fixed batch size with nothing
around it: no HTTP, no Redis, no JSON. The processes load and warm up first, then encode together
in the same time windows, one window per batch size, so they contend for the cores as the served
workers do. The best batch size's sentences/s, summed over the processes, is what no server
can beat; the served/ceiling ratio says what the framework costs.

Each process also reports its CPU per sentence: the model's own CPU, which the served scenario's
CPU per request can be compared with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.options import positive_numbers

ROOT = Path(__file__).resolve().parents[1]
# Between two batch sizes' windows: longer than one call of the largest batch of short texts, so a
# process that overran its window never overlaps the next one.
GAP_S = 1.0
READY = "ready"


@dataclass
class Ceiling:
    """One batch size, all processes together."""

    batch: int
    sentences_s: float  # sum over the processes
    call_ms: float  # median time of one encode() call, over the processes
    cpu_ms_per_sentence: float  # the processes' CPU while encoding, per sentence


def _window(encoder: Any, texts: list[str], start: float, seconds: float) -> dict[str, float]:
    """Encode `texts` again and again from `start` (wall clock) for `seconds`."""
    delay = start - time.time()
    if delay > 0:
        time.sleep(delay)
    calls: list[float] = []
    cpu_started = time.process_time()
    began = time.perf_counter()
    stop_at = began + seconds
    while not calls or time.perf_counter() < stop_at:
        called = time.perf_counter()
        encoder.encode(texts)
        calls.append(time.perf_counter() - called)
    elapsed = time.perf_counter() - began
    done = len(calls) * len(texts)
    return {"sentences_s": done / elapsed, "call_ms": statistics.median(calls) * 1000,
            "cpu_ms_per_sentence": (time.process_time() - cpu_started) * 1000 / done}


def child(text: str, batches: list[int], seconds: float, threads: int) -> None:
    """One encoder process: load, warm up on every batch shape, say ready, then encode in the
    windows the parent's start time fixes; one JSON line of results per batch size."""
    from examples.embedding.encoder import SentenceEncoder

    encoder = SentenceEncoder.load(None, intra_op_threads=threads, inter_op_threads=1)
    encoder.warm_up()
    for size in batches:
        encoder.encode([text] * size)  # a new shape: let TensorFlow settle on it before timing
    print(READY, flush=True)
    start = float(sys.stdin.readline())
    results = {}
    for index, size in enumerate(batches):
        results[size] = _window(encoder, [text] * size, start + index * (seconds + GAP_S), seconds)
    print(json.dumps(results), flush=True)


def measure(text: str, batches: list[int], seconds: float, processes: int = 2, threads: int = 1,
            timeout: float = 600) -> list[Ceiling]:
    """The encoder's sentences/s at each batch size, `processes` processes of `threads` threads
    encoding at once (each its own interpreter, as the dispatcher's spawned workers)."""
    command = [sys.executable, "-m", "benchmarks.ceiling", "--child", "--text", text, "--seconds", str(seconds),
               "--threads", str(threads), "--batches", ",".join(map(str, batches))]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # TensorFlow's start-up lines would clutter the run's output: each process's stderr is kept
    # in a file, shown only if the process fails.
    logs = [tempfile.TemporaryFile("w+") for _ in range(processes)]
    children = [subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=log, text=True) for log in logs]
    try:
        for proc, log in zip(children, logs, strict=True):
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline().strip()
            if line != READY:
                proc.wait(30)
                log.seek(0)
                raise RuntimeError(f"benchmarks.ceiling: an encoder process failed to start:\n{log.read()[-4000:]}")
        start = time.time() + 0.5
        for proc in children:
            proc.stdin.write(f"{start}\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        outputs = [json.loads(proc.communicate(timeout=timeout)[0]) for proc in children]
    finally:
        for proc in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    ceilings = []
    for size in batches:
        each = [output[str(size)] for output in outputs]
        rate = sum(r["sentences_s"] for r in each)
        # CPU per sentence over all processes: each one's, weighted by its share of the sentences.
        cpu = sum(r["cpu_ms_per_sentence"] * r["sentences_s"] for r in each) / rate
        ceilings.append(Ceiling(size, rate, statistics.median(r["call_ms"] for r in each), cpu))
    return ceilings


def best(ceilings: list[Ceiling], largest_batch: int | None = None) -> Ceiling:
    """The fastest batch size, among those a server limited to `largest_batch` could run."""
    return max((c for c in ceilings if largest_batch is None or c.batch <= largest_batch),
               key=lambda c: c.sentences_s)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.run import SHORT_TEXT

    parser = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=positive_numbers, default=[1, 8, 16, 32, 64],
                        help="batch sizes (default 1,8,16,32,64)")
    parser.add_argument("--seconds", type=float, default=5.0, help="encoding time per batch size (default 5)")
    parser.add_argument("--processes", type=int, default=2, help="encoder processes (default 2, as MaxWorkers)")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads each (default 1)")
    parser.add_argument("--text", default=SHORT_TEXT,
                        help="the text encoded (default: the served scenario's short text)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.text, args.batches, args.seconds, args.threads)
        return
    ceilings = measure(args.text, args.batches, args.seconds, args.processes, args.threads)
    print(f"{args.processes} process(es) x {args.threads} TensorFlow thread(s), {os.cpu_count()} CPUs")
    print("| batch | sentences/s | ms per call | CPU ms per sentence |\n|---:|---:|---:|---:|")
    for c in ceilings:
        print(f"| {c.batch} | {c.sentences_s:.0f} | {c.call_ms:.1f} | {c.cpu_ms_per_sentence:.2f} |")
    top = best(ceilings)
    print(f"ceiling: {top.sentences_s:.0f} sentences/s at batch {top.batch}")


if __name__ == "__main__":
    main()
