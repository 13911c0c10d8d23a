"""Anti-replay window, RFC 4303 §3.4.3 / Appendix A2, checked against a
plain set-based model of the same rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.replay import MAX_WINDOW, ReplayWindow


def accept(w: ReplayWindow, seq: int) -> bool:
    if w.check(seq):
        w.update(seq)
        return True
    return False


def test_fresh_window_accepts_one_and_rejects_zero() -> None:
    w = ReplayWindow(64)
    assert not w.check(0)
    assert accept(w, 1)
    assert not accept(w, 1)


def test_window_edges() -> None:
    w = ReplayWindow(64)
    assert accept(w, 100)
    # 100-63 = 37 is the oldest number still inside a 64-wide window.
    assert w.check(37)
    assert not w.check(36)
    assert accept(w, 37)
    assert not accept(w, 37)
    # Sliding right by exactly the window width forgets everything before it.
    assert accept(w, 164)
    assert not w.check(100)
    assert w.check(101)
    assert w.top == 164


def test_jump_larger_than_window_resets_bitmap() -> None:
    w = ReplayWindow(32)
    for s in range(1, 33):
        assert accept(w, s)
    assert accept(w, 10_000)
    assert w.check(10_000 - 31) and not w.check(10_000 - 32)
    assert not w.check(10_000)


def test_out_of_order_inside_window() -> None:
    w = ReplayWindow(16)
    for s in (5, 3, 4, 1, 2, 10, 7):
        assert accept(w, s)
    for s in (1, 2, 3, 4, 5, 7, 10):
        assert not w.check(s)
    for s in (6, 8, 9, 11):
        assert w.check(s)


def test_largest_window_and_max_sequence() -> None:
    w = ReplayWindow(MAX_WINDOW)
    assert accept(w, 2**32 - 1)
    assert w.check(2**32 - MAX_WINDOW)
    assert not w.check(2**32 - MAX_WINDOW - 1)
    assert not w.check(2**32)  # not a 32-bit sequence number (no ESN)


@pytest.mark.parametrize("size", [0, -1, MAX_WINDOW + 1])
def test_bad_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        ReplayWindow(size)


def test_check_alone_never_moves_the_window() -> None:
    """What a forged packet can at most cause (InboundSa never updates for it)."""
    w = ReplayWindow(64)
    accept(w, 50)
    assert w.check(5000)
    assert w.top == 50 and w.check(49)


@given(
    size=st.integers(1, 300),
    seqs=st.lists(st.integers(0, 2000), max_size=200),
)
@settings(max_examples=200, deadline=None)
def test_matches_reference_model(size: int, seqs: list[int]) -> None:
    w = ReplayWindow(size)
    seen: set[int] = set()
    top = 0
    for s in seqs:
        expected = s > 0 and s not in seen and s > top - size
        assert accept(w, s) == expected, (s, top)
        if expected:
            seen.add(s)
            top = max(top, s)


@given(
    size=st.integers(1, 300),
    seqs=st.lists(st.integers(-1, 2000), max_size=200),
)
@settings(max_examples=200, deadline=None)
def test_accept_equals_check_then_update(size: int, seqs: list[int]) -> None:
    """The hot-path ``accept`` (used by InboundSa) behaves like check+update."""
    a, b = ReplayWindow(size), ReplayWindow(size)
    for s in seqs:
        assert a.accept(s) == accept(b, s), s
        assert (a.top, a.check(s)) == (b.top, b.check(s))


def test_restore_from_checkpoint_refuses_everything_up_to_it() -> None:
    w = ReplayWindow(64)
    w.restore(1000)
    assert not any(w.check(s) for s in range(900, 1001))
    assert w.accept(1001) and w.accept(1200)
    assert not w.check(1001)
    with pytest.raises(ValueError):
        w.restore(2**32)
