"""Values read from the catalog, kept for as long as the catalog's files are unchanged.

The REST service answers the same reads (a job's detail, polled by every client watching it)
far more often than the catalog changes, and a catalog read costs ~40 ms of CPU (opening the
file is half of it; `Catalog.job_detail` runs five queries) and holds the file lock that the
job's driver needs to commit a part. `CatalogCache.get(key, read)` runs `read` only when
`Catalog.stamp()` (the catalog file's and its write-ahead log's mtime and size: a stat each)
changed since the value was read, and one read per key runs at a time.

While a job commits parts (every 0.2 s in bench/service.py) the stamp changes faster than a
loaded machine reads the catalog, so a caller that accepts it (`max_stale_s`) gets the last
value while another request reads the new one, as long as that value was confirmed current
(its stamp seen unchanged) within `max_stale_s`: what it returns was the catalog's state at
most that long ago. Without it (the default) a caller waits for a read that began after it
arrived, or shares one that began on the same unchanged stamp.

Stamps can lie in one case, as git's index does ("racy git"): an mtime has the granularity of
the kernel's clock tick (up to 10 ms on older kernels), so a write in the same tick as the
stamp taken before a read, leaving the size unchanged (a checkpoint rewrites the catalog file
in place), leaves the stamp as it was. A value whose stamp was younger than RACY_S when it was
taken is not trusted: it answers only requests that arrived before its read began, and the
next request reads again.
"""

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

V = TypeVar("V")

# Longer than two clock ticks of the coarsest kernel clock (HZ=100).
RACY_S = 0.02


def _newest_ns(stamp: tuple) -> int:
    """The newest mtime in a `Catalog.stamp()`: ((mtime_ns, size) or None, ...)."""
    return max((part[0] for part in stamp if part is not None), default=0)


@dataclass
class _Read:
    stamp: tuple
    trusted: bool
    started: float  # time.monotonic() just after the stamp was taken
    future: Future = field(default_factory=Future)

    def answers(self, stamp: tuple, arrived: float) -> bool:
        """Whether this read's value is current for a request that arrived at `arrived` and
        now sees `stamp`: it began after the request did, or on the same trusted stamp."""
        return self.started >= arrived or (self.trusted and self.stamp == stamp)


@dataclass
class _Slot:
    done: _Read | None = None  # the last read that completed, with its value in its future
    pending: _Read | None = None  # the read in flight
    confirmed: float = 0.0  # when done's value was last known to be the catalog's state


class CatalogCache(Generic[V]):
    def __init__(self, catalog: Any, limit: int = 1024, racy_s: float = RACY_S) -> None:
        self.catalog = catalog  # anything with `stamp() -> tuple` (curate.catalog.Catalog)
        self.limit = limit
        self.racy_ns = int(racy_s * 1e9)
        self.reads = 0  # reads begun (tests look)
        self._lock = threading.Lock()
        self._slots: OrderedDict[Hashable, _Slot] = OrderedDict()

    def get(self, key: Hashable, read: Callable[[], V], max_stale_s: float = 0.0) -> V:
        """`read()`'s value for `key`: kept while the catalog is unchanged; with `max_stale_s`,
        possibly the last value while another request reads (see the module's doc). `read`'s
        exceptions reach every request sharing that read and are not kept."""
        arrived = time.monotonic()
        while True:
            stamp = self.catalog.stamp()
            now = time.monotonic()
            trusted = time.time_ns() - _newest_ns(stamp) > self.racy_ns
            mine = wait = None
            with self._lock:
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slots[key] = _Slot()
                    while len(self._slots) > self.limit:
                        self._slots.popitem(last=False)
                self._slots.move_to_end(key)
                done, pending = slot.done, slot.pending
                if done is not None and done.answers(stamp, arrived):
                    if done.trusted and done.stamp == stamp:
                        slot.confirmed = now
                    return done.future.result()
                if pending is None:
                    mine = slot.pending = _Read(stamp, trusted, now)
                    self.reads += 1
                elif done is not None and max_stale_s and now - slot.confirmed <= max_stale_s:
                    return done.future.result()  # another request is reading the change
                else:
                    wait = pending
            if mine is not None:
                return self._read(key, slot, mine, read)
            try:
                value = wait.future.result()
            except BaseException:
                if wait.answers(stamp, arrived):
                    raise
                continue  # an older read failed: look again
            if wait.answers(stamp, arrived):
                return value
            # It began before this request on a stamp that has changed since: the next read.

    def _read(self, key: Hashable, slot: _Slot, mine: _Read, read: Callable[[], V]) -> V:
        try:
            value = read()
        except BaseException as error:
            mine.future.set_exception(error)
            with self._lock:
                # The last value may be what failed (a deleted job): no more answers from it.
                slot.pending = slot.done = None
            raise
        mine.future.set_result(value)
        with self._lock:
            slot.pending = None
            slot.done = mine
            slot.confirmed = mine.started  # the value is the state at some time after this
        return value
