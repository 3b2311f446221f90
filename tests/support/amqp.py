"""RabbitMQ for the tests: queues made and removed with kombu's own AMQP client (the machine's broker is shared)."""

from __future__ import annotations

import contextlib
from typing import Any

from kombu import Connection


def delete_amqp_queues(url: str, *names: str) -> None:
    """Delete these queues (and the exchanges of the same names) if they exist."""
    with Connection(url, connect_timeout=5) as conn:
        for name in names:
            with contextlib.suppress(Exception), conn.channel() as channel:
                channel.queue_delete(name)
            with contextlib.suppress(Exception), conn.channel() as channel:
                channel.exchange_delete(name)


def declare_amqp_queue(url: str, name: str, **arguments: Any) -> None:
    """A durable queue with these `x-…` arguments, made the way an operator's policy would shape it."""
    with Connection(url, connect_timeout=5) as conn, conn.channel() as channel:
        channel.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)


def queue_type_is(url: str, name: str, queue_type: str) -> bool:
    """Whether RabbitMQ accepts re-declaring the queue with this `x-queue-type` (it refuses a different one)."""
    with Connection(url, connect_timeout=5) as conn, conn.channel() as channel:
        try:
            channel.queue_declare(name, durable=True, auto_delete=False, arguments={"x-queue-type": queue_type})
        except Exception as exc:
            if "PRECONDITION_FAILED" in str(exc) or "406" in str(exc):
                return False
            raise
    return True


def queue_depth(url: str, name: str) -> int:
    """Messages ready in the queue (a passive declare)."""
    with Connection(url, connect_timeout=5) as conn, conn.channel() as channel:
        return int(channel.queue_declare(name, passive=True).message_count)
