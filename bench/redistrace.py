"""Count the Redis round trips a piece of code makes in this process.

redis-py writes each command, and each pipeline or transaction as a whole, with one
`send_packed_command` call on a connection, then reads the replies: one call is one round trip.
Counts every client in the process (Fleet's, not the broker's in a benchmark that sends no messages).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from redis.connection import AbstractConnection


class RoundTrips:
    """`counting()` patches the connection class for a block and counts its writes; `total` is the tally."""

    def __init__(self) -> None:
        self.total = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[RoundTrips]:
        """Count the round trips the block makes, added to `total`."""
        original = AbstractConnection.send_packed_command

        @functools.wraps(original)
        def counted(conn: AbstractConnection, *args: Any, **kwargs: Any) -> None:
            self.total += 1
            original(conn, *args, **kwargs)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
        try:
            yield self
        finally:
            AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
