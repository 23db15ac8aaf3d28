"""Taking answers off reply lists, for whoever waits on them: the HTTP tier and `goinfer batch`.

Each waits on its own lists (goinfer.queue.reply_key) and must take every answer that arrived at
once, in as few round trips as Redis allows: one BLMPOP per wake-up on Redis 7, or, on an older
Redis, BLPOP for the first answer then LPOP for the rest.

The BLMPOP goes straight onto a connection each reader keeps, not through the client's
execute_command: redis-py's way (retry wrapper, argument checks, a pool take and give-back per
command) cost ~14 % of the HTTP process's CPU when answers come one at a time (a 10 ms model).
A connection whose command failed part way, or was cancelled, is closed and given back, so that
the next one comes from the pool as the pool connects it (behind Sentinel, to the new master);
one whose command Redis refused is given back open, where the tier's closing of idle connections
reaches it.
"""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from goinfer.connections import take_connection


class ReplyPopper:
    """Pops what waits on reply lists; remembers whether this Redis has BLMPOP."""

    def __init__(self) -> None:
        self._blmpop = True  # until Redis says it has no BLMPOP (before 7.0)
        # Per reader (its lists), the client and the connection it keeps.
        self._held: dict[tuple[str, ...], tuple[Any, AbstractConnection]] = {}

    async def pop(self, client: Any, keys: list[str], timeout_s: float, count: int) -> list[bytes]:
        """Up to `count` replies from the first of `keys` that holds some, waiting up to
        `timeout_s` for one; [] when none came."""
        if self._blmpop:
            try:
                # [key, [replies]], or None after the timeout.
                popped = await self._command(client, keys, "BLMPOP", timeout_s, len(keys), *keys, "LEFT", "COUNT",
                                             count)
                return list(popped[1]) if popped else []
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._blmpop = False
        item = await client.blpop(keys, timeout=timeout_s)
        if item is None:
            return []
        # LPOP with a count answers a list (redis-py types it as one value).
        rest = cast("list[bytes] | None", await client.lpop(item[0], count - 1))
        return [item[1], *(rest or ())]

    async def _command(self, client: Any, keys: list[str], *args: Any) -> Any:
        """`args`' reply, on the connection the reader of `keys` keeps with `client`."""
        reader = tuple(keys)
        connection = await self._connection(client, reader)
        try:
            await connection.send_command(*args)
            return await connection.read_response()
        except ResponseError:
            # In step, but given back: the error may come from a server that no longer takes
            # writes (READONLY), and the tier closes the pool's idle connections once it knows.
            await self._give_back(reader)
            raise
        except BaseException:  # cancelled, or the connection failed: it may be out of step
            await self._give_back(reader, disconnect=True)
            raise

    async def _connection(self, client: Any, reader: tuple[str, ...]) -> AbstractConnection:
        held = self._held.get(reader)
        if held is not None:
            if held[0] is client:
                return held[1]
            await self._give_back(reader)  # on a cluster, the lists' primary changed
        connection: AbstractConnection = await take_connection(client.connection_pool, "BLMPOP")
        self._held[reader] = (client, connection)
        return connection

    async def _give_back(self, reader: tuple[str, ...], disconnect: bool = False) -> None:
        client, connection = self._held.pop(reader)
        if disconnect:
            await connection.disconnect()
        await client.connection_pool.release(connection)
