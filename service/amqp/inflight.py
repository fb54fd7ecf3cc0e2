"""One delivery in progress, as the settler tracks it through its settle.

Its life: taken; then, once the attempt has ended, :meth:`InFlight.begin_settle`; then
the settle's confirmed publishes, announced together by :meth:`InFlight.publishing`,
each reporting through its :class:`Send` when it was handed to a connection; then
:meth:`InFlight.acking`. Only these methods change it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from service.amqp.publisher import Outbox


class InFlight:
    """A delivery being worked on: its message, its channel, and how far its settle got."""

    __slots__ = ("_acked", "_sends", "_settling", "channel", "message")

    def __init__(self, message: AbstractIncomingMessage, channel: Any) -> None:
        self.message = message
        # The (aiormq) channel it was delivered on: its delivery tag is only valid there.
        self.channel = channel
        self._settling = False
        self._sends: list[int | None] | None = None  # per publish: its connection generation
        self._acked = False

    @property
    def settling(self) -> bool:
        """Whether the attempt has ended and its decision is being carried out."""
        return self._settling

    @property
    def acked(self) -> bool:
        """Whether the ack was sent (or tried)."""
        return self._acked

    def begin_settle(self) -> None:
        """The attempt ended: from now on the work is only carried out, never cancelled."""
        self._settling = True

    def publishing(self, count: int) -> list[Send]:
        """The settle's ``count`` confirmed publishes go out now: one :class:`Send` each,
        for the publisher to report on. After them, the delivery is acked."""
        self._settling = True
        self._sends = [None] * count
        return [Send(self, i) for i in range(count)]

    def acking(self) -> None:
        """The ack goes out now."""
        self._acked = True

    def alive(self) -> bool:
        """Whether the delivery is still ours (its channel open)."""
        return not self.channel.is_closed

    def committed(self, publisher: Outbox) -> bool:
        """Every publish of the settle went out on a connection the broker still reads:
        acking now cannot lose one."""
        sends = self._sends
        return (
            sends is not None
            and all(publisher.live(generation) for generation in sends)
            and self.alive()
        )


class Send:
    """One publish of a settle, as the publisher reports on it (``Tracked``)."""

    __slots__ = ("_index", "_work")

    def __init__(self, work: InFlight, index: int) -> None:
        self._work = work
        self._index = index

    def alive(self) -> bool:
        """Whether the delivery it is for is still ours."""
        return self._work.alive()

    def sent(self, generation: int) -> None:
        """The publish was handed to the publishing connection of ``generation``."""
        sends = self._work._sends
        assert sends is not None  # noqa: S101 - made by publishing()
        sends[self._index] = generation


class SettledCopies:
    """The copy ids this replica settled lately (at most ``size``), so a second copy of
    one (a retry copy published twice across a lost confirm) is dropped, not run again."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, copy_id: object) -> bool:
        return copy_id in self._ids

    def remember(self, copy_id: str | None) -> None:
        """``copy_id`` was settled (nothing to remember for a producer's own message)."""
        if copy_id is not None:
            self._ids[copy_id] = None
            if len(self._ids) > self._size:
                self._ids.popitem(last=False)
