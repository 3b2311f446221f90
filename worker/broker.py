"""Two adjustments to kombu's Redis transport, applied in worker processes only: a guard and a cached client.

The guard, around one kombu failure mode:

When the Redis connection dies (a broker restart), kombu tears down the channel's connection object, but
two paths still use that channel afterwards: restoring unacknowledged messages while the channel closes,
and acking, after the reconnect, a task that was running when the connection died. Both build a Redis
client from the torn-down connection and raise AttributeError ('NoneType' object has no attribute
'hostname'), which Celery treats as unrecoverable: the worker shuts down instead of carrying on (seen with
kombu 5.7 / celery 5.7; the same family as celery/kombu#582). Raising the transport's own ConnectionError
there instead lets kombu handle it as it handles any broker outage (`ignore_errors`, `ack_log_error`).

Skipping that restore or ack loses nothing: AIQ's sweeper re-sends every due pending row from PostgreSQL,
and a delivery the row no longer wants is a no-op. (With `ack_emulation` off, see shared/queue.py, an ack is
in the worker's memory and only the restore still reaches Redis.)

On RabbitMQ (py-amqp transport) neither applies: a lost connection closes its channels, RabbitMQ requeues the
unacked deliveries itself, and an ack on the dead channel is a connection error kombu already logs and ignores.
Neither adjustment is installed there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
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


def reuse_sync_client(settings: Settings) -> None:
    """On Redis, give each kombu channel one synchronous client instead of a new one per acknowledgement.

    Every Redis command of the channel outside the BRPOP (a publish from the worker: a retry's re-send, a batch
    step; a restore) goes through `conn_or_acquire`, which builds a fresh `redis.Redis`, and redis-py 8 copies
    its whole table of response callbacks into every new client: 110 µs of CPU each (measured; when acks still
    cost two pipelines per message, ~4 % of the worker's CPU under a steady trickle). The client is
    thread-safe (each command or pipeline takes its own connection from the channel's pool), so one per pool
    is enough; a reconnect makes a new pool and with it a new client, and a torn-down channel still goes
    through `_connparams` (see `guard_dead_channel`).
    """
    if settings.broker_is_amqp:
        return
    original: Callable[..., Any] = kombu_redis.Channel.conn_or_acquire
    if getattr(original, _GUARDED, False):
        return

    @contextlib.contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_aiq_sync_client")
        if cached is None or cached[0] is not pool:
            cached = (pool, self._create_client())
            self.__dict__["_aiq_sync_client"] = cached
        yield cached[1]

    setattr(conn_or_acquire, _GUARDED, True)
    setattr(kombu_redis.Channel, "conn_or_acquire", conn_or_acquire)  # noqa: B010 - mypy forbids assigning methods
