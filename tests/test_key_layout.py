"""The Redis key layout that lets one queue's commands run on a Redis Cluster: every key that one
command, script or MULTI/EXEC of queue N touches hashes to queue N's slot, and a replayed
signature always meets its replay key there."""

from __future__ import annotations

from collections import Counter

import pytest
from redis.crc import key_slot

from goinfer.queue import (
    DISPATCHERS_SET,
    dead_letter_stream,
    dispatcher_key,
    queue_tag,
    replay_target,
    reply_key,
    stats_key,
    stream_name,
    streams_for,
    tier_alive_key,
)


def slot(key: str) -> int:
    return key_slot(key.encode())


@pytest.mark.parametrize("index", [0, 1, 2, 7, 1023])
def test_every_key_of_a_queue_shares_its_slot(index):
    streams = streams_for("goinfer-", ["custom{odd}", None, "other"], [index], with_default=True)
    _, replay = next(replay_target("app", f"sig{i}", 1024) for i in range(10**6)
                     if replay_target("app", f"sig{i}", 1024)[0] == index)
    keys = [*streams, *map(dead_letter_stream, streams), *map(stats_key, streams), replay,
            reply_key("a1b2", index)]
    assert {slot(key) for key in keys} == {slot(queue_tag(index))}


def test_queues_of_a_three_primary_cluster_fall_on_different_primaries():
    """`redis-cli --cluster create` gives three primaries a third of the 16384 slots each."""
    assert sorted(slot(queue_tag(index)) * 3 // 16384 for index in range(3)) == [0, 1, 2]


def test_a_replayed_signature_lands_on_the_same_queue_with_the_same_key():
    first = replay_target("app", "the signature", 4)
    assert replay_target("app", "the signature", 4) == first
    assert replay_target("other-app", "the signature", 4)[1] != first[1]
    assert first[1].startswith(f"goinfer:seen:{queue_tag(first[0])}:app:")


def test_signatures_spread_evenly_over_the_queues():
    counts = Counter(replay_target("app", f"signature {i}", 4)[0] for i in range(4000))
    assert set(counts) == {0, 1, 2, 3}
    assert all(800 <= count <= 1200 for count in counts.values()), counts


def test_keys_outside_any_queue_carry_no_queue_tag():
    """Read on their own (never in a queue's transaction), so they may live on any node."""
    assert "{" not in tier_alive_key("a1b2")
    assert "{q" not in dispatcher_key("host", 42)


def test_heartbeats_share_the_slot_of_the_set_that_names_them():
    """The prune script and the MGET of all heartbeats touch the set and every key at once."""
    keys = [DISPATCHERS_SET, dispatcher_key("host", 42), dispatcher_key("other{q1}", 7)]
    assert {slot(key) for key in keys} == {slot(DISPATCHERS_SET)}


def test_a_brace_in_a_queue_name_cannot_move_its_stream_to_another_slot():
    assert slot(stream_name("odd{name}", 5)) == slot(queue_tag(5))
