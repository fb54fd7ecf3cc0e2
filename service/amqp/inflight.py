"""One delivery in progress, as the consumer tracks it through its settle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from service.amqp.publisher import Publisher


@dataclass(slots=True)
class InFlight:
    """A delivery being worked on: its message, its channel, and how far its settle got."""

    message: AbstractIncomingMessage
    channel: Any  # the (aiormq) channel it was delivered on: its delivery tag is only valid there
    settling: bool = False  # the attempt has ended; its decision is being carried out
    final: bool = False  # the settle's last publish is under way
    sent_on: int | None = None  # the publishing connection that last publish went out on
    acked: bool = False

    def alive(self) -> bool:
        """Whether the delivery is still ours (its channel open)."""
        return not self.channel.is_closed

    def sent(self, generation: int) -> None:
        """The publisher handed a publish of this delivery to connection ``generation``."""
        if self.final:
            self.sent_on = generation

    def committed(self, publisher: Publisher) -> bool:
        """The last publish went out on a connection still up and unblocked: the broker
        reads it before that connection's end, so acking now cannot lose it."""
        link = publisher.link
        return (
            self.sent_on == link.generation
            and link.ready.is_set()
            and link.unblocked.is_set()
            and self.alive()
        )
