"""`with_keepalive` (shared/services/events.py): the events in order, a None per quiet interval, the source's
errors raised to the reader, and the source closed when the reader stops early. Pure logic over a generator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from shared.events import Event, EventType
from shared.services.events import with_keepalive

pytestmark = pytest.mark.anyio


def _event(seq: int) -> Event:
    return Event(seq, EventType.DELTA, 1, {"text": str(seq)})


async def test_events_come_in_order_with_a_none_for_each_quiet_interval() -> None:
    async def source() -> AsyncIterator[Event]:
        yield _event(1)
        await asyncio.sleep(0.35)
        yield _event(2)
        yield _event(3)

    got = [e.seq if e is not None else None async for e in with_keepalive(source(), 0.1)]
    # Keep-alives (about three) in the gap only.
    assert got[0] == 1
    assert got[-2:] == [2, 3]
    assert len(got[1:-2]) >= 2
    assert set(got[1:-2]) == {None}


async def test_an_error_of_the_source_reaches_the_reader() -> None:
    async def source() -> AsyncIterator[Event]:
        yield _event(1)
        raise ValueError("log unreadable")

    stream = with_keepalive(source(), 5)
    first = await anext(stream)
    assert first is not None
    assert first.seq == 1
    with pytest.raises(ValueError, match="log unreadable"):
        await anext(stream)


async def test_a_reader_that_stops_early_closes_the_source() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[Event]:
        try:
            seq = 0
            while True:
                seq += 1
                yield _event(seq)
        finally:
            closed.set()

    stream = with_keepalive(source(), 5)
    async for event in stream:
        assert event is not None
        if event.seq == 2:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert closed.is_set()


async def test_a_source_waiting_when_the_reader_stops_is_closed_too() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncIterator[Event]:
        try:
            yield _event(1)
            await asyncio.sleep(60)
            yield _event(2)
        finally:
            closed.set()

    stream = with_keepalive(source(), 0.05)
    async for event in stream:
        if event is None:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert closed.is_set()
