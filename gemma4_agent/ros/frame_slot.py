"""A one-slot mailbox between the subscription callback and the inference worker: latest wins."""
from __future__ import annotations

import threading
from typing import Any, Optional


class LatestSlot:
    """Holds at most one item. `put` replaces a pending item (and says so); `take` waits for one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Optional[Any] = None
        self._closed = False

    def put(self, item: Any) -> bool:
        """Store `item`; True if it replaced one the worker had not taken (that one is dropped)."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
            return replaced

    def take(self, timeout: float) -> Optional[Any]:
        """The pending item (emptying the slot), or None after `timeout` s or once closed."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def clear(self) -> bool:
        """Drop a pending item; True if there was one."""
        with self._cond:
            had, self._item = self._item is not None, None
            return had

    def close(self) -> None:
        """Wake a waiting `take` for good (worker shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._item = None
