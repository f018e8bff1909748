"""The CoAP duplicate cache stays within its bounds, per source and in total."""

from __future__ import annotations

from types import SimpleNamespace

from aiocoap.numbers.types import CON

from konsul.protocols.coap.dedup import compact_duplicates


class MessageInterfaceUDP6:  # the name compact_duplicates checks for
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.transport = SimpleNamespace(sendmsg=lambda data, *rest: self.sent.append(data))


def manager_with_cache(total: int, per_source: int):
    clock = [0.0]
    refused: list[str] = []
    manager = SimpleNamespace(
        message_interface=MessageInterfaceUDP6(),
        loop=SimpleNamespace(time=lambda: clock[0]),
        _deduplicate_message=None,
        _store_response_for_duplicates=None,
    )
    compact_duplicates(manager, total, per_source, lambda reason, source: refused.append(reason))
    return manager, clock, refused


def message(host: str, mid: int):
    return SimpleNamespace(
        remote=SimpleNamespace(sockaddr=(host, 5683, 0, 0)),
        mid=mid,
        mtype=CON,
        transport_tuning=SimpleNamespace(EXCHANGE_LIFETIME=247.0),
    )


def test_a_source_past_its_bound_is_processed_without_being_remembered() -> None:
    manager, _clock, refused = manager_with_cache(total=100, per_source=3)
    seen = manager._deduplicate_message
    assert [seen(message("a", mid)) for mid in range(5)] == [False] * 5
    assert seen(message("a", 1)) is True  # remembered
    assert seen(message("a", 4)) is False  # past the bound: not remembered, processed again
    assert refused.count("duplicates_per_source") == 3
    assert seen(message("b", 1)) is False and seen(message("b", 1)) is True  # others unaffected


def test_past_the_total_the_oldest_is_forgotten_and_expiry_gives_places_back() -> None:
    manager, clock, refused = manager_with_cache(total=4, per_source=10)
    seen = manager._deduplicate_message
    for n in range(6):
        seen(message(f"h{n}", n))
    assert refused.count("duplicates_total") == 2
    assert seen(message("h0", 0)) is False  # forgotten (the oldest went first)
    assert seen(message("h5", 5)) is True
    clock[0] = 1000.0  # everything expired
    assert seen(message("h5", 5)) is False
    for n in range(3):
        assert seen(message("h5", 100 + n)) is False
    assert refused.count("duplicates_total") == 3  # h0 again, nothing since expiry
