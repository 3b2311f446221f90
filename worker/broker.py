"""A guard around one kombu failure mode of the Redis transport, applied in worker processes only.

When the Redis connection dies (a broker restart), kombu tears down the channel's connection object, but
two paths still use that channel afterwards: restoring unacknowledged messages while the channel closes,
and acking, after the reconnect, a task that was running when the connection died. Both build a Redis
client from the torn-down connection and raise AttributeError ('NoneType' object has no attribute
'hostname'), which Celery treats as unrecoverable: the worker shuts down instead of carrying on (seen with
kombu 5.7 / celery 5.7; the same family as celery/kombu#582). Raising the transport's own ConnectionError
there instead lets kombu handle it as it handles any broker outage (`ignore_errors`, `ack_log_error`).

Skipping that restore or ack loses nothing: the message is either still in Redis' unacked set (restored
after the visibility timeout; the row's claim then makes it a no-op) or gone with a restarted Redis, and
AIQ's sweeper re-sends every due pending row from PostgreSQL either way.

On RabbitMQ (py-amqp transport) there is no such path: a lost connection closes its channels, RabbitMQ
requeues the unacked deliveries itself, and an ack on the dead channel is a connection error kombu already
logs and ignores. The guard is not installed there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

from shared.config import Settings

log = logging.getLogger(__name__)
_GUARDED = "_aiq_guarded"


def guard_dead_channel(settings: Settings) -> None:
    """On Redis, make a client request on a torn-down channel an ordinary connection error."""
    if settings.broker_is_amqp:
        return
    original: Callable[..., Any] = kombu_redis.Channel._connparams
    if getattr(original, _GUARDED, False):
        return

    @functools.wraps(original)
    def _connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None or self.connection.client is None:
            log.warning("broker channel used after its connection closed; treated as a connection error")
            raise redis.exceptions.ConnectionError("broker connection already closed")
        return original(self, *args, **kwargs)

    setattr(_connparams, _GUARDED, True)
    setattr(kombu_redis.Channel, "_connparams", _connparams)  # noqa: B010 - mypy forbids assigning methods
