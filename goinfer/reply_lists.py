"""Taking answers off reply lists, for whoever waits on them: the HTTP tier and `goinfer batch`.

Each waits on its own lists (goinfer.queue.reply_key) and must take every answer that arrived at
once, in as few round trips as Redis allows: one BLMPOP per wake-up on Redis 7, or, on an older
Redis, BLPOP for the first answer then LPOP for the rest.
"""

from __future__ import annotations

from typing import Any, cast

from redis.exceptions import ResponseError


class ReplyPopper:
    """Pops what waits on reply lists; remembers whether this Redis has BLMPOP."""

    def __init__(self) -> None:
        self._blmpop = True  # until Redis says it has no BLMPOP (before 7.0)

    async def pop(self, client: Any, keys: list[str], timeout_s: float, count: int) -> list[bytes]:
        """Up to `count` replies from the first of `keys` that holds some, waiting up to
        `timeout_s` for one; [] when none came."""
        if self._blmpop:
            try:
                # [key, [replies]], or None after the timeout.
                popped = await client.execute_command("BLMPOP", timeout_s, len(keys), *keys, "LEFT", "COUNT", count)
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
