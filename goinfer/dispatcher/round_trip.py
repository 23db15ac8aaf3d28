"""A worker's commands to Redis, written at once and read back in order: one round trip.

This is what redis-py's non-transactional pipeline does, without its per-command bookkeeping
(options, response callbacks, deprecation wrappers), which cost a third of a worker's round
trip that answers, acknowledges and reads on (microbenchmark against a real redis-server, 7
commands: ~160 -> ~115 us of CPU). Only the commands a worker sends are here, and each reply
is what the pipeline would give, but raw: bytes and integers, a ResponseError in place of a
refused command's reply, and XREADGROUP's entries as redis-py shapes them.

A worker's round trips follow one another, so they keep one connection (HeldConnection) rather
than take one from the pool and give it back each time, which cost another ~10 % of a worker's
CPU per echo request (redis-py 8 records pool metrics at each). A connection whose round trip
failed part way is closed and given back (the next one takes another), so no later command reads
a reply meant for this one; nothing is retried (a read that was lost may have taken entries: see the
worker's recovery of unsent replies).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import redis
from redis.connection import AbstractConnection
from redis.exceptions import ResponseError

from goinfer.connections import take_connection

Parser = Callable[[Any], Any]


class HeldConnection:
    """A connection taken from a client's pool once and kept for every round trip on that client
    (another client, after a cluster's slot moved: the old connection goes back to its pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # a worker's sender thread and its main thread take turns
        self._client: redis.Redis | None = None
        self._connection: AbstractConnection | None = None

    @contextmanager
    def of(self, client: redis.Redis) -> Iterator[AbstractConnection]:
        with self._lock:
            if client is not self._client or self._connection is None:
                self._give_back()
                self._connection = take_connection(client.connection_pool, "PIPELINE")
                self._client = client
            try:
                yield self._connection
            except BaseException:
                # Closed and given back: the next round trip takes one from the pool, which
                # connects it as the pool does (behind Sentinel, to whoever is master now; a
                # connection reopened by itself would go back to the old address).
                self._connection.disconnect()
                self._give_back()
                raise

    def _give_back(self) -> None:
        if self._client is not None and self._connection is not None:
            self._client.connection_pool.release(self._connection)  # type: ignore[arg-type]
        self._client = self._connection = None


class RoundTrip:
    """Commands queued for `client`, sent by `execute` as one write on `held`'s connection."""

    def __init__(self, client: redis.Redis, held: HeldConnection) -> None:
        self._client = client
        self._held = held
        self.command_stack: list[tuple[Any, ...]] = []
        self._parsers: dict[int, Parser] = {}

    def execute_command(self, *args: Any) -> None:
        self.command_stack.append(args)

    def rpush(self, key: str, *values: Any) -> None:
        self.command_stack.append(("RPUSH", key, *values))

    def expire(self, key: str, seconds: int) -> None:
        self.command_stack.append(("EXPIRE", key, seconds))

    def hset(self, key: str, mapping: Mapping[Any, Any]) -> None:
        self.command_stack.append(("HSET", key, *(part for pair in mapping.items() for part in pair)))

    def hincrby(self, key: str, field: str, amount: int) -> None:
        self.command_stack.append(("HINCRBY", key, field, amount))

    def xack(self, stream: str, group: str, *ids: Any) -> None:
        self.command_stack.append(("XACK", stream, group, *ids))

    def xdel(self, stream: str, *ids: Any) -> None:
        self.command_stack.append(("XDEL", stream, *ids))

    def xreadgroup(self, group: str, consumer: str, streams: Mapping[str, str], count: int,
                   block: int) -> None:
        self._parsers[len(self.command_stack)] = _stream_entries
        self.command_stack.append(("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", block,
                                   "STREAMS", *streams.keys(), *streams.values()))

    def execute(self) -> list[Any]:
        """Every command's reply, in order; a refused command's ResponseError in its place.
        Raises what the connection raises (ConnectionError, TimeoutError) once closed."""
        commands, self.command_stack = self.command_stack, []
        parsers, self._parsers = self._parsers, {}
        with self._held.of(self._client) as connection:
            connection.send_packed_command(connection.pack_commands(commands))
            results: list[Any] = []
            for index in range(len(commands)):
                try:
                    reply = connection.read_response()
                except ResponseError as refused:
                    results.append(refused)
                    continue
                parse = parsers.get(index)
                results.append(reply if parse is None else parse(reply))
            return results


def _stream_entries(reply: Any) -> list[list[Any]]:
    """XREADGROUP's reply as redis-py gives it: [[stream, [(id, {field: value}), ...]], ...]."""
    if not reply:
        return []
    streams = reply.items() if isinstance(reply, dict) else reply  # RESP3 answers a map
    return [[stream, [(entry_id, _pairs(flat)) for entry_id, flat in entries]] for stream, entries in streams]


def _pairs(flat: Any) -> dict[Any, Any]:
    if isinstance(flat, dict):
        return flat
    flat = flat or []  # an entry deleted while pending has no fields
    return dict(zip(flat[::2], flat[1::2], strict=True))
