"""A worker's commands to Redis, written at once and read back in order: one round trip.

This is what redis-py's non-transactional pipeline does, without its per-command bookkeeping
(options, response callbacks, deprecation wrappers), which cost a third of a worker's round
trip that answers, acknowledges and reads on (microbenchmark against a real redis-server, 7
commands: ~160 -> ~115 us of CPU). Only the commands a worker sends are here, and each reply
is what the pipeline would give, but raw: bytes and integers, a ResponseError in place of a
refused command's reply, and XREADGROUP's entries as redis-py shapes them.

A connection whose round trip failed part way is closed before it goes back to the pool, so no
later command reads a reply meant for this one; nothing is retried (a read that was lost may
have taken entries: see the worker's recovery of unsent replies).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import redis
from redis.connection import ConnectionPool
from redis.exceptions import ResponseError

Parser = Callable[[Any], Any]

# redis-py 5.3 and later take no command name here (and warn when given one); earlier ones need one.
_NAMELESS_GET_CONNECTION = inspect.signature(ConnectionPool.get_connection).parameters.get(
    "command_name", inspect.Parameter("command_name", inspect.Parameter.POSITIONAL_OR_KEYWORD)
).default is not inspect.Parameter.empty


class RoundTrip:
    """Commands queued on a client's pool, sent by `execute` as one write."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool: ConnectionPool = client.connection_pool
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
        connection = self._pool.get_connection() if _NAMELESS_GET_CONNECTION else \
            self._pool.get_connection(commands[0][0])  # type: ignore[call-arg,unused-ignore]
        try:
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
        except BaseException:
            connection.disconnect()
            raise
        finally:
            self._pool.release(connection)


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
