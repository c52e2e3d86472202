"""Bounded hand-over buffers for the live path.

The live path never queues: a producer overwrites, a consumer takes the newest, and every overwritten
item is counted so the UI can show how many frames the AI skipped.
"""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class SlotClosed(Exception):
    """Raised by :meth:`LatestSlot.take` once the slot is closed and empty."""


class LatestSlot(Generic[T]):
    """A one-element, overwrite-on-put slot with a counter of overwritten (dropped) items.

    Drop policy: *drop oldest*. ``put`` never blocks; an item that was never taken is replaced and
    counted in :attr:`dropped`. ``take`` blocks until an item is there (no polling), returns it and
    empties the slot. ``peek`` returns the newest item without consuming it (for painters that repaint
    the same frame until a newer one arrives).
    """

    __slots__ = ("_closed", "_cond", "_dropped", "_item", "_put_count", "_taken")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._item: T | None = None
        self._taken = True
        self._dropped = 0
        self._put_count = 0
        self._closed = False

    def put(self, item: T) -> bool:
        """Store ``item``; return True when it replaced an item nobody had taken."""
        with self._cond:
            overwrote = not self._taken
            if overwrote:
                self._dropped += 1
            self._item = item
            self._taken = False
            self._put_count += 1
            self._cond.notify()
        return overwrote

    def take(self, timeout: float | None = None) -> T | None:
        """Wait for an untaken item and return it; None on timeout.

        Raises:
            SlotClosed: the slot was closed and holds no untaken item.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._taken:
                if self._closed:
                    raise SlotClosed
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            self._taken = True
            return self._item

    def peek(self) -> T | None:
        """Return the newest item (taken or not) without consuming it. Lock-free read of one reference."""
        return self._item

    def close(self) -> None:
        """Wake every waiter; later ``take`` calls raise :class:`SlotClosed` once the slot is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False

    @property
    def dropped(self) -> int:
        """Items overwritten before anyone took them."""
        return self._dropped

    @property
    def put_count(self) -> int:
        return self._put_count

    @property
    def closed(self) -> bool:
        return self._closed
