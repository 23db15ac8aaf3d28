"""What one message between two processes costs on this machine, before any of goinfer's code.

    python -m benchmarks.wakeups [--messages 3000]

Every goinfer request crosses processes several times (client -> HTTP tier -> Redis -> worker
-> Redis -> HTTP tier -> client), and at low load each crossing wakes a process that sleeps.
This prints, from one run:

- one byte sent back and forth over loopback TCP between two processes that block on their
  reads (each message wakes the other side), and the same when both busy-poll (nobody sleeps):
  the difference is what the wake-ups cost here, twice per round trip;
- a PING to a private redis-server through asyncio streams on uvloop (the floor of any asyncio
  Redis client) and through redis-py's asyncio client: the client's CPU and wall time each.

On the project's VM (2 vCPUs): blocking 67-78 us at the median, busy-polling 10-11 us; the
asyncio PING 41-99 us of the client's CPU, redis-py's 104-248 us, as the VM's speed moves. These
bound what the 1-connection latency and the CPU per request at low load can reach whatever the
framework does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time

import redis.asyncio
import uvloop

from goinfer.testing import start_redis


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def _recv_one(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(1)
        except BlockingIOError:  # busy-polling: try again at once
            continue


def ping_pong(messages: int, busy_poll: bool) -> list[float]:
    """Round trips in microseconds between this process and a forked echoer."""
    client, server = _pair()
    child = os.fork()
    if child == 0:  # the echoer
        client.close()
        server.setblocking(not busy_poll)
        while data := _recv_one(server):
            server.send(data)
        os._exit(0)
    server.close()
    client.setblocking(not busy_poll)
    times = []
    for _ in range(messages):
        started = time.perf_counter()
        client.send(b"x")
        _recv_one(client)
        times.append((time.perf_counter() - started) * 1e6)
    client.close()
    os.waitpid(child, 0)
    return times


async def redis_pings(port: int, messages: int) -> dict[str, tuple[float, float]]:
    """(CPU, wall) microseconds per PING: raw asyncio streams, then redis-py's client."""
    results = {}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for label in ("warm-up", "asyncio streams"):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(messages):
            writer.write(b"PING\r\n")
            await reader.readline()
        results[label] = ((time.process_time() - cpu) / messages * 1e6, (time.perf_counter() - wall) / messages * 1e6)
    writer.close()
    client = redis.asyncio.Redis(host="127.0.0.1", port=port)
    for label in ("warm-up", "redis-py asyncio client"):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(messages):
            await client.ping()
        results[label] = ((time.process_time() - cpu) / messages * 1e6, (time.perf_counter() - wall) / messages * 1e6)
    await client.aclose()
    del results["warm-up"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wakeups", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000, help="round trips per measurement (default 3000)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, {args.messages} round trips each")
    for busy_poll in (False, True):
        times = sorted(ping_pong(args.messages, busy_poll))
        how = "both busy-poll" if busy_poll else "both block (each message wakes the other)"
        print(f"loopback TCP, one byte, {how}: p50 {statistics.median(times):.0f} us, "
              f"p90 {times[int(len(times) * 0.9)]:.0f} us")
    server = start_redis()
    try:
        for label, (cpu, wall) in uvloop.run(redis_pings(server.port, args.messages)).items():
            print(f"PING to redis-server through {label} (uvloop): client CPU {cpu:.0f} us, wall {wall:.0f} us")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
