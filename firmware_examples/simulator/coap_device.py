"""A simulated device over CoAP, on asyncio (aiocoap), on the fleet's CoAP thread (``coap_host``).

Each connection of a device has its own aiocoap client context, so its own
UDP port: aiocoap allows one confirmable exchange at a time per remote
endpoint (NSTART = 1), and a fleet sharing one socket would send one
request at a time between all its devices. A new context per connection is
also what a rebooted device looks like from the agent: a new source port.

A connection registers with the Resource Directory (``POST /rd?ep=&lt=&tk=``),
observes ``/devices/<id>/desired``, reports its state, then sends samples
(``POST /devices/<id>/telemetry``, CBOR) one at a time; a 2.04 Changed means
the agent stored it. The registration is refreshed before it lapses. A
random drop cancels the observation and, half the time, removes the
registration first (a clean shutdown); the other half the device just goes
quiet, as if it lost power.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import cbor2
from aiocoap import Context, Message
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code

from .device import Counts, SimDevice

CBOR = 60
LIFETIME = 300  # seconds of registration lifetime; refreshed at 3/4 of it


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _completed(future: asyncio.Future) -> Any:
    """Await an aiocoap response future without cancelling it when the wait is cancelled.

    aiocoap completes its futures itself, and logs an InvalidStateError for one
    cancelled under it; ``Context.shutdown()`` ends what is still pending, and
    the result is then retrieved here so that asyncio does not log it either.
    """
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_retrieve)
        raise


class CoapRefused(Exception):
    """The agent answered a request with an error code."""


class CoapSession:
    """One connection (registration) of one device; ends by raising, or returning after a random drop."""

    def __init__(self, device: SimDevice, context: Context, base_uri: str, counters: Counts) -> None:
        self.device = device
        self.context = context
        self.base_uri = base_uri
        self.counters = counters
        credentials = [f"ep={device.device_id}"]
        if device.token is not None:
            credentials.append(f"tk={device.token}")
        self.credentials = tuple(credentials)
        self.location: tuple[str, ...] = ()
        self.remote: Any = None  # the agent's aiocoap remote, once known
        self.interval_changed = asyncio.Event()

    def message(self, code: Code, path: tuple[str, ...], payload: bytes = b"", query: tuple[str, ...] = (), **options: Any) -> Message:
        if self.remote is None:
            message = Message(code=code, uri=self.base_uri, payload=payload, **options)
        else:
            # The agent's address as resolved for the first request: a Uri
            # makes aiocoap resolve it again, in a thread, for every request.
            message = Message(code=code, payload=payload, **options)
            message.remote = self.remote
        message.opt.uri_path = path
        message.opt.uri_query = self.credentials + query
        if payload:
            message.opt.content_format = CBOR
        return message

    async def request(self, code: Code, path: tuple[str, ...], payload: bytes = b"", query: tuple[str, ...] = ()) -> Message:
        response = await _completed(self.context.request(self.message(code, path, payload, query)).response)
        if not response.code.is_successful():
            detail = response.payload.decode("utf-8", "replace")[:200]
            raise CoapRefused(f"{code.name} /{'/'.join(path)}: {response.code} {detail}")
        return response

    def device_path(self, leaf: str) -> tuple[str, ...]:
        return ("devices", self.device.device_id, leaf)

    async def register(self) -> None:
        response = await self.request(Code.POST, ("rd",), query=(f"lt={LIFETIME}",))
        self.location = tuple(response.opt.location_path)
        self.remote = response.remote

    async def report(self, state: dict[str, Any]) -> None:
        await self.request(Code.POST, self.device_path("reported"), cbor2.dumps(state))
        self.counters.reported_sent += 1

    async def follow_desired(self) -> None:
        # Not cancelled on the way out: the context's shutdown right after ends
        # it, and aiocoap 0.4 raises (in a task nobody awaits) when it has to
        # fail an observation that was cancelled first.
        observed = self.context.request(self.message(Code.GET, self.device_path("desired"), observe=0))
        await self.on_desired(await _completed(observed.response))
        async for notification in observed.observation:
            await self.on_desired(notification)
        raise CoapRefused("the agent ended the observation of desired state")

    async def on_desired(self, response: Message) -> None:
        if not response.code.is_successful():
            raise CoapRefused(f"GET desired: {response.code}")
        try:
            desired = cbor2.loads(response.payload) if response.payload else {}
        except (ValueError, cbor2.CBORDecodeError):
            self.counters.failed(self.device.device_id, "desired state is not CBOR")
            return
        reported, interval_changed = self.device.follow_desired(desired, self.counters)
        if reported is None:
            return
        if interval_changed:
            self.interval_changed.set()
        await self.report(reported)

    async def send_sample(self, seq: int, payload: bytes) -> None:
        await self.request(Code.POST, self.device_path("telemetry"), payload)
        if self.device.unacked.pop(seq, None) is not None:
            self.counters.samples_acked += 1

    async def drive(self) -> None:
        """Samples, registration refreshes and the random drop; returns on the drop."""
        device, counters = self.device, self.counters
        for seq, payload in list(device.unacked.items()):
            counters.samples_resent += 1
            await self.send_sample(seq, payload)
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_sample = now + device.rng.uniform(0, device.interval)
        refresh_at = now + LIFETIME * 0.75
        drop_at = now + device.disconnect_after()
        while True:
            wake = min(next_sample, refresh_at, drop_at)
            if not math.isinf(wake):
                try:
                    async with asyncio.timeout_at(wake):
                        await self.interval_changed.wait()
                except TimeoutError:
                    pass
            now = loop.time()
            if self.interval_changed.is_set():
                self.interval_changed.clear()
                next_sample = min(next_sample, now + device.interval)
                continue
            if now >= drop_at:
                counters.random_disconnects += 1
                if device.rng.random() < 0.5:
                    await self.request(Code.DELETE, self.location)
                return
            if now >= refresh_at:
                await self.request(Code.POST, self.location, query=(f"lt={LIFETIME}",))
                refresh_at = now + LIFETIME * 0.75
            if now >= next_sample:
                next_sample = max(next_sample + device.interval, now)
                sample = device.next_sample()
                payload = cbor2.dumps(sample)
                device.unacked[sample["seq"]] = payload
                counters.samples_sent += 1
                await self.send_sample(sample["seq"], payload)

    async def run(self) -> None:
        await self.report(self.device.initial_report())
        follower = asyncio.ensure_future(self.follow_desired())
        driver = asyncio.ensure_future(self.drive())
        try:
            done, _ = await asyncio.wait((follower, driver), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise why the connection ended, if it failed
        finally:
            for task in (follower, driver):
                task.cancel()
            await asyncio.gather(follower, driver, return_exceptions=True)


LOST_CONNECTION = (OSError, asyncio.TimeoutError, coap_error.Error, CoapRefused)


async def run_coap_device(
    device: SimDevice, base_uri: str, counters: Counts, connecting: asyncio.Semaphore
) -> None:
    """Keep ``device`` registered over CoAP until cancelled, re-registering with backoff."""
    while True:
        context: Context | None = None
        try:
            async with connecting:
                context = await Context.create_client_context()
                session = CoapSession(device, context, base_uri, counters)
                await session.register()
            with device.online(counters):
                await session.run()
        except LOST_CONNECTION as exc:
            counters.failed(device.device_id, f"coap: {str(exc) or type(exc).__name__}")
        finally:
            if context is not None:
                await context.shutdown()
        await asyncio.sleep(device.backoff())
        counters.reconnects += 1
