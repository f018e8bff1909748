"""``konsul sim``'s process: run a fleet until the duration ends or a signal comes."""

from __future__ import annotations

import logging
import math
import signal
import sys

import trio

from .device import FleetCounters
from .fleet import FleetConfig, ProvisioningError, report_periodically, run_fleet


def _emit(line: str) -> None:
    print(line, flush=True)


async def run_for(config: FleetConfig, duration: float, report_every: float) -> FleetCounters:
    """Run the fleet for ``duration`` seconds (inf: until SIGTERM or SIGINT); its final counters."""
    counters = FleetCounters()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            await nursery.start(run_fleet, config, counters)
            _emit(
                f"sim: {config.devices} devices ({config.protocol}, prefix {config.prefix!r}, "
                f"{'anonymous' if config.anonymous else 'with tokens'}) against "
                f"mqtt {config.mqtt_addr}, coap {config.coap_addr}; {config.rate:g} samples/s each"
            )
            if report_every > 0:
                nursery.start_soon(report_periodically, counters, report_every, _emit)
            if not math.isinf(duration):
                await trio.sleep(duration)
                nursery.cancel_scope.cancel()
    return counters


def _user_error(error: BaseException) -> BaseException | None:
    """The first error inside a (possibly nested) exception group that the user can act on."""
    if isinstance(error, (ProvisioningError, ValueError)):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _user_error(inner)
            if found is not None:
                return found
    return None


def main(config: FleetConfig, duration: float, report_every: float) -> int:
    """Run ``konsul sim``; prints the final summary. Exit status 0 unless start-up failed."""
    # One line per provisioned device, per CoAP retransmission otherwise; the
    # summary lines count what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("coap").setLevel(logging.WARNING)
    try:
        counters = trio.run(run_for, config, duration, report_every)
    except BaseException as error:  # noqa: BLE001 - reported below or re-raised
        reason = _user_error(error)
        if reason is None:
            raise
        print(f"konsul sim: {reason}", file=sys.stderr)
        return 2
    _emit(counters.summary().replace("sim:", "sim: final:", 1))
    return 0
