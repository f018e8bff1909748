from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sync_support import BASE_MS, WallClock

from konsul.sync.hlc import HybridClock, Stamp

stamps = st.builds(
    Stamp,
    st.integers(0, 2**48 - 1),
    st.integers(0, 0xFFFF),
    st.text("0123456789abcdef", min_size=12, max_size=12),
)


@given(stamps, stamps)
def test_encoded_stamps_sort_like_stamps(a, b):
    assert (a.encode() < b.encode()) == (a < b)
    assert Stamp.decode(a.encode()) == a


@given(stamps)
def test_compact_stamps_decode_to_the_same_stamp(a):
    text = a.compact()
    assert Stamp.decode(text) == a
    # 16 characters, 18 with a counter of 64 or more; the long form past 2109.
    expected = 30 if a.wall_ms >= 64**7 else 16 if a.counter < 64 else 18
    assert len(text) == expected
    assert "." not in text or text == a.encode()


@given(stamps, stamps)
def test_compact_stamps_of_one_length_sort_like_stamps(a, b):
    if len(a.compact()) == len(b.compact()):
        assert (a.compact() < b.compact()) == (a < b)


def test_compact_texts_are_pinned():
    """Version ids are stored and exchanged: their text must never change."""
    assert Stamp(1_764_230_000_000, 7, "abcdef012345").compact() == "Of3ILq-6ewrj-HC4"
    assert Stamp(1_764_230_000_000, 4097, "abcdef012345").compact() == "Of3ILq-0-0ewrj-HC4"


@pytest.mark.parametrize("replica", ["a", "e1", "ABCDEF012345", "-12345678901", "0123456789abc"])
def test_other_replica_ids_keep_the_long_form(replica):
    stamp = Stamp(1_764_230_000_000, 7, replica)
    assert stamp.compact() == stamp.encode()
    assert Stamp.decode(stamp.compact()) == stamp


@pytest.mark.parametrize("text", ["", "abc", "P7R7B7y4-HC4Osa", "P7R7B7y4-HC4Osa!", "P7R7B7y4-HC4Osa+"])
def test_malformed_stamps_are_rejected(text):
    with pytest.raises(ValueError):
        Stamp.decode(text)


def test_stamps_follow_the_wall_clock():
    wall = WallClock()
    clock = HybridClock("r1", wall)
    first = clock.now()
    wall.ms += 5
    second = clock.now()
    assert (first.wall_ms, second.wall_ms) == (BASE_MS, BASE_MS + 5)
    assert first < second


def test_stamps_never_go_backwards_when_the_wall_clock_does():
    wall = WallClock()
    clock = HybridClock("r1", wall)
    issued = [clock.now()]
    wall.ms -= 60_000  # NTP steps the clock back a minute
    issued += [clock.now(), clock.now()]
    assert issued == sorted(issued)
    assert len(set(issued)) == 3
    assert all(s.wall_ms == BASE_MS for s in issued)


def test_counter_overflow_borrows_the_next_millisecond():
    clock = HybridClock("r1", WallClock())
    clock.observe(Stamp(BASE_MS, 0xFFFE, "r0"))  # a busy peer used up the counter
    issued = [clock.now() for _ in range(3)]
    assert [(s.wall_ms - BASE_MS, s.counter) for s in issued] == [(0, 0xFFFF), (1, 0), (1, 1)]
    assert [s.encode() for s in issued] == sorted(s.encode() for s in issued)
    assert len({len(s.encode()) for s in issued}) == 1


def test_a_stamp_after_observing_a_remote_one_is_later_even_with_a_slow_clock():
    fast = HybridClock("fast", WallClock(BASE_MS + 10_000))
    slow = HybridClock("slow", WallClock(BASE_MS))
    seen = fast.now()
    slow.observe(seen)
    assert slow.now() > seen


def test_equal_wall_and_counter_are_ordered_by_replica_id():
    a = HybridClock("aaa", WallClock()).now()
    b = HybridClock("bbb", WallClock()).now()
    assert (a.wall_ms, a.counter) == (b.wall_ms, b.counter)
    assert a < b


@pytest.mark.parametrize("replica", ["", "has.dot"])
def test_replica_ids_must_be_non_empty_without_dots(replica):
    with pytest.raises(ValueError):
        HybridClock(replica)


def test_a_remote_stamp_far_ahead_moves_the_clock_only_up_to_the_skew_bound():
    wall = WallClock()
    clock = HybridClock("aaaaaaaaaaaa", wall, max_skew_ms=300_000)
    year_6429 = Stamp(140_712_508_800_000, 5, "bbbbbbbbbbbb")
    clock.observe(year_6429)
    assert clock.skewed == 1
    assert clock.now().wall_ms == BASE_MS + 300_000  # at the bound, not in 6429
    # Stamps within the bound are followed exactly, as before.
    near = Stamp(BASE_MS + 299_000, 7, "bbbbbbbbbbbb")
    clock = HybridClock("aaaaaaaaaaaa", wall, max_skew_ms=300_000)
    clock.observe(near)
    assert clock.now() == Stamp(BASE_MS + 299_000, 8, "aaaaaaaaaaaa")
    assert clock.skewed == 0


@given(st.lists(stamps, max_size=20))
def test_the_clock_never_passes_wall_time_plus_skew_and_never_goes_back(seen):
    wall = WallClock()
    clock = HybridClock("aaaaaaaaaaaa", wall, max_skew_ms=1000)
    last = clock.now()
    for stamp in seen:
        clock.observe(stamp)
        issued = clock.now()
        assert issued > last
        assert issued.wall_ms <= max(wall.ms + 1000, last.wall_ms + 1)
        last = issued
