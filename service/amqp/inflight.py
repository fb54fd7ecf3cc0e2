"""One delivery in progress, as the settler tracks it through its settle.

Its life: taken, then (once the attempt ended) :meth:`InFlight.begin_settle`,
then zero or more publishes, the last one announced by
:meth:`InFlight.last_publish`, then :meth:`InFlight.acking`. Only these
methods change it; the settler calls them, the publisher reports each publish
with :meth:`InFlight.sent`.
"""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from service.amqp.publisher import Outbox


class InFlight:
    """A delivery being worked on: its message, its channel, and how far its settle got."""

    __slots__ = ("_acked", "_final", "_sent_on", "_settling", "channel", "message")

    def __init__(self, message: AbstractIncomingMessage, channel: Any) -> None:
        self.message = message
        # The (aiormq) channel it was delivered on: its delivery tag is only valid there.
        self.channel = channel
        self._settling = False
        self._final = False
        self._sent_on: int | None = None
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

    def last_publish(self) -> None:
        """The next publish is the settle's last: once it went out, the delivery is acked."""
        self._settling = self._final = True

    def acking(self) -> None:
        """The ack goes out now."""
        self._acked = True

    def sent(self, generation: int) -> None:
        """The publisher handed a publish of this delivery to connection ``generation``."""
        if self._final:
            self._sent_on = generation

    def alive(self) -> bool:
        """Whether the delivery is still ours (its channel open)."""
        return not self.channel.is_closed

    def committed(self, publisher: Outbox) -> bool:
        """The last publish went out on a connection the broker still reads: acking now
        cannot lose it."""
        return publisher.live(self._sent_on) and self.alive()
