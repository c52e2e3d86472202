from __future__ import annotations

import threading

import pytest

from guidance.slots import LatestSlot, SlotClosed


def test_put_take_counts_overwrites() -> None:
    slot: LatestSlot[int] = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True  # 1 was never taken
    assert slot.put(3) is True
    assert slot.dropped == 2
    assert slot.take(0) == 3
    assert slot.take(0) is None  # empty again: timeout
    assert slot.put(4) is False  # previous item was taken, nothing dropped
    assert slot.dropped == 2
    assert slot.peek() == 4
    assert slot.put_count == 4


def test_take_blocks_until_put_and_close_wakes() -> None:
    slot: LatestSlot[str] = LatestSlot()
    got: list[str | None] = []
    closed = threading.Event()

    def consumer() -> None:
        try:
            while True:
                got.append(slot.take())
        except SlotClosed:
            closed.set()

    t = threading.Thread(target=consumer, name="guidance-test-consumer")
    t.start()
    slot.put("a")
    # The consumer takes "a" eventually; then close must wake it even though it is blocked in take().
    for _ in range(200):
        if got:
            break
        threading.Event().wait(0.005)
    slot.close()
    t.join(2)
    assert not t.is_alive()
    assert closed.is_set()
    assert got == ["a"]


def test_closed_slot_still_delivers_pending_item() -> None:
    slot: LatestSlot[int] = LatestSlot()
    slot.put(7)
    slot.close()
    assert slot.take() == 7
    with pytest.raises(SlotClosed):
        slot.take()
    slot.reopen()
    assert slot.take(0) is None
