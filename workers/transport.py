"""kombu's Redis transport, made to survive its own cleanup after a lost connection.

kombu 5.7 with Celery 5.7: when the consumer loses Redis (a restart, a failover), Celery collects
the connection and then closes it; closing the channel restores its unacknowledged messages through
a client that the collect already dropped, which raises AttributeError (`conninfo.hostname` of
None). That is no connection error, so Celery calls it unrecoverable and the worker stops consuming
and exits once its running tasks end: one Redis restart would stop the whole fleet. The same happens
to the late acknowledgement of a task that was running across the loss.

Here those calls give up quietly instead: the messages stay in kombu's `unacked` hash, where the
visibility timeout brings them back, and a redelivered `fleet.execute` starts nothing (its claim is
fenced in the database). Nothing else of the transport changes. Named by `broker_transport` in
workers/app.py; tests/faults/test_review.py restarts Redis under a running agent.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    """The channel's unacknowledged messages, tolerant of a channel whose connection is gone."""

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        """Restore at close, unless the client is already gone (see the module's docstring)."""
        try:
            return super().restore_unacked_once(stderr)  # type: ignore[no-untyped-call]
        except AttributeError:
            log.warning("kombu: left the unacknowledged messages of a lost connection to the visibility timeout")
            return None

    def ack(self, delivery_tag: Any) -> Any:
        """Acknowledge, unless the message's channel lost its connection (it is redelivered, and refused)."""
        try:
            return super().ack(delivery_tag)  # type: ignore[no-untyped-call]
        except AttributeError:
            log.warning("kombu: could not acknowledge a message of a lost connection")
            return None

    def reject(self, delivery_tag: Any, requeue: bool = False) -> Any:
        """Reject, unless the message's channel lost its connection."""
        try:
            return super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]
        except AttributeError:
            log.warning("kombu: could not reject a message of a lost connection")
            return None


class Channel(kombu_redis.Channel):
    """The Redis channel with the tolerant QoS."""

    QoS = QoS


class Transport(kombu_redis.Transport):
    """The Redis transport with the tolerant channel."""

    Channel = Channel
