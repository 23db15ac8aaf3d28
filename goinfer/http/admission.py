"""How many costly unverified requests the HTTP process takes on at once, per client and in all.

A request whose body may be larger than API.InlineCheckBytes holds memory while its body is
received, and one whose body is not cheap to check holds a check process while it is checked,
all before anything is known about its sender. Without a bound, one client on many connections
could hold MaxBodyBytes on each and keep the check processes busy for everyone. So such a
request first takes a place here: at most API.MaxUnverifiedPerClient per client address and
API.MaxUnverified in all; past that it is refused at once (TooManyUnverified), a large one
before its body is read. (Within one connection HTTP/1.1 serves one request at a time.) Bodies
cheap to check take no place: they are checked on the event loop in well under a millisecond.
"""

from __future__ import annotations

from collections import Counter


class Admission:
    """Counts the large unverified requests in progress, by client address."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self._by_client: Counter[str] = Counter()
        self._count = 0

    @property
    def in_progress(self) -> int:
        return self._count

    def enter(self, client: str) -> str | None:
        """Take a place for a request from `client`; None if taken, else why it was refused
        (then nothing is taken and `leave` must not be called)."""
        if self._by_client[client] >= self.per_client:  # (a Counter reads a missing key as 0, storing nothing)
            return f"{self.per_client} from this address in progress (API.MaxUnverifiedPerClient)"
        if self._count >= self.total:
            return f"{self.total} in progress (API.MaxUnverified)"
        self._by_client[client] += 1
        self._count += 1
        return None

    def leave(self, client: str) -> None:
        """Give back the place `enter` took for `client`."""
        self._count -= 1
        self._by_client[client] -= 1
        if self._by_client[client] <= 0:
            del self._by_client[client]
