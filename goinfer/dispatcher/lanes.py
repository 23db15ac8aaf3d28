"""Reading priority lanes: always from the highest lane that holds something.

A worker reads every lane of its streams (queue.with_lanes: live requests, then jobs, then batch
rows). XREADGROUP over several streams hands out entries of every stream that has some, so a
worker busy with a backlog of batch rows would take rows beside each live request, and live
traffic would queue behind them. Instead, while work is waiting, one script reads the lanes in
order and returns the first non-empty answer (XREADGROUP without BLOCK, which scripts may not
use): one round trip, like the plain read it replaces. Only when every lane is empty does the
worker block, with one XREADGROUP on all lanes; entries that arrive on several lanes at once
are served highest first (`by_lane`).

The script also says whether any lane still holds undelivered entries ("more"), so the worker
knows whether its next read may block. It looks cheaply: a lane that gave fewer entries than
asked for has none left (XREADGROUP with ">" takes every new entry up to COUNT), so only the lanes
below it are looked at, and those are usually empty. A blocking read says the same by itself:
every lane that gave fewer than COUNT is drained. So an idle worker costs one round trip per
request, and so does a busy one, with no command beyond the read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from goinfer.queue import PRIORITIES, lane_stream

# KEYS: the lanes, highest first. ARGV[1]: group, ARGV[2]: consumer, ARGV[3]: how many entries
# to take (at least 1).
# Returns {answer, more}: answer is XREADGROUP's for the first lane that had entries ({} when
# none did); more is 1 when that lane or one below it still holds undelivered entries.
# An entry is undelivered when it is newer than the group's last-delivered-id.
READ_LANES_SCRIPT = """
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function newer(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then return true end
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local function waiting(lane)
  local last = redis.call('XREVRANGE', lane, '+', '-', 'COUNT', 1)
  if #last == 0 then return false end
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', lane)) do
    local name, delivered
    for i = 1, #info, 2 do
      if info[i] == 'name' then name = info[i + 1] end
      if info[i] == 'last-delivered-id' then delivered = info[i + 1] end
    end
    if name == group then return delivered == nil or newer(last[1][1], delivered) end
  end
  return true
end
for i, lane in ipairs(KEYS) do
  local got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', lane, '>')
  if got then
    if #got[1][2] >= count then return {got, 1} end
    for j = i + 1, #KEYS do
      if waiting(KEYS[j]) then return {got, 1} end
    end
    return {got, 0}
  end
end
return {{}, 0}
"""
READ_LANES_SHA = hashlib.sha1(READ_LANES_SCRIPT.encode()).hexdigest()


def read_lanes_args(lanes: Sequence[str], group: str, consumer: str, count: int) -> list[Any]:
    """EVALSHA's arguments for READ_LANES_SCRIPT."""
    return [READ_LANES_SHA, len(lanes), *lanes, group, consumer, max(1, count)]


def drained_after(answer: Any, count: int) -> bool:
    """Whether a read of every lane (XREADGROUP ... COUNT `count` on all of them) left nothing
    undelivered: every lane gave fewer entries than asked for."""
    return all(len(entries) < count for _, entries in answer or ())


def decode_lanes_answer(answer: Any) -> tuple[list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], bool]:
    """(XREADGROUP's answer as redis-py decodes it, more) from the script's raw answer.

    A script's answer comes back as nested lists: field/value pairs flat, not a dict.
    """
    got, more = answer[0] or [], bool(answer[1])
    streams = []
    for stream, entries in got:
        decoded = []
        for entry_id, flat in entries:
            flat = flat or []
            decoded.append((entry_id, dict(zip(flat[::2], flat[1::2], strict=True))))
        streams.append((stream, decoded))
    return streams, more


def lane_ranks(streams: Iterable[str]) -> dict[str, int]:
    """Every lane of `streams` -> its priority's rank (0 the highest): the order to serve them in."""
    return {lane_stream(stream, priority): rank for stream in streams for rank, priority in enumerate(PRIORITIES)}
