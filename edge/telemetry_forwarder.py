"""Forwarding the telemetry buffer to the hub over the sync connection.

While connected, the oldest buffered samples go to the hub in batches (an
``eph`` frame of kind ``telemetry``), a few batches in flight at once. The hub
answers each with ``telemetry-ack`` once the batch is durable there, and only
then are its rows deleted here. A batch whose acknowledgement never comes
(the connection dropped, the edge crashed) is sent again on the next
connection; the hub keeps one copy per (site, device, seq), so the resend
costs bandwidth and nothing else.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import trio

from konsul.sync.errors import KonsulError
from konsul.sync.link import SyncLink
from konsul.sync.telemetry import ACK_KIND, BATCH_KIND, batch_message

from .telemetry_buffer import TelemetryBuffer

log = logging.getLogger("konsul.edge.telemetry")

BATCH_SAMPLES = 500
# A batch also stops at this many bytes of sample data (a lone larger sample
# goes alone): 500 samples of up to 512 KiB each would make a frame past the
# hub's limit, which would end the connection on every resend.
BATCH_BYTES = 4 * 1024 * 1024
BATCHES_IN_FLIGHT = 4
RETRY_AFTER_REFUSAL_S = 1.0


class TelemetryForwarder:
    """Moves one edge's buffered telemetry to its hub, one connection at a time."""

    def __init__(self, buffer: TelemetryBuffer, site: str) -> None:
        self.buffer = buffer
        self.site = site
        self._acks: deque[tuple[int, bool]] = deque()
        self._wake = trio.Event()
        self._in_flight: dict[int, int] = {}  # batch id (its last row id) -> its first row id

    def on_ephemeral(self, kind: str, data: Any) -> bool:
        """Take a hub acknowledgement; returns whether the message was one."""
        if kind != ACK_KIND:
            return False
        if isinstance(data, dict) and type(data.get("b")) is int:
            self._acks.append((data["b"], data.get("ok") is True))
            self._wake.set()
            refused = data.get("refused")
            if type(refused) is int and refused > 0:
                log.warning(
                    "the hub refused %d forwarded telemetry samples (unreadable, of a deleted device, or numbered "
                    "far ahead: the hub's log says which); they are deleted here", refused,
                )
        else:
            log.warning("ignoring a malformed telemetry acknowledgement: %.200r", data)
        return True

    async def run(self, link: SyncLink) -> None:
        """Forward until cancelled (the connection's end cancels it)."""
        self._in_flight.clear()
        self._acks.clear()
        sent_upto = 0
        self.buffer.listeners.append(self._wake_soon)
        try:
            while True:
                self._wake = trio.Event()
                refused = await self._settle_acks()
                if refused:
                    # The hub could not store a batch: start over after a pause.
                    await trio.sleep(RETRY_AFTER_REFUSAL_S)
                    self._in_flight.clear()
                    sent_upto = 0
                    continue
                while len(self._in_flight) < BATCHES_IN_FLIGHT:
                    rows = _within_bytes(await self.buffer.oldest(sent_upto, BATCH_SAMPLES), BATCH_BYTES)
                    if not rows:
                        break
                    first, last = rows[0][0], rows[-1][0]
                    self._in_flight[last] = first
                    self.buffer.in_flight_upto = max(self.buffer.in_flight_upto, last)
                    link.send_ephemeral(self.site, BATCH_KIND, batch_message(last, [s for _, s in rows]))
                    sent_upto = last
                if not self._acks:
                    await self._wake.wait()
        finally:
            self.buffer.listeners.remove(self._wake_soon)

    def _wake_soon(self) -> None:
        self._wake.set()

    async def _settle_acks(self) -> bool:
        """Delete what the hub stored; returns True if it refused a batch."""
        refused = False
        while self._acks:
            batch_id, ok = self._acks.popleft()
            first = self._in_flight.pop(batch_id, None)
            if first is None:
                continue  # from an earlier connection, or a duplicate
            if not ok:
                refused = True
                continue
            try:
                await self.buffer.acknowledged(first, batch_id)
            except KonsulError as error:
                # The rows stay and go again later; the hub drops the copies.
                log.error("could not delete forwarded telemetry: %s", error)
        return refused


def _within_bytes(rows: list, limit: int) -> list:
    """The first rows whose sample data add up to at most ``limit`` bytes (one row at least)."""
    total = 0
    for count, (_, sample) in enumerate(rows):
        total += len(sample.data)
        if total > limit and count:
            return rows[:count]
    return rows
