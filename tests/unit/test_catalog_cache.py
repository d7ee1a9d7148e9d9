"""Catalog reads kept while the catalog is unchanged (curate/catalog_cache.py): one read per
change, shared by concurrent callers; never an answer older than the caller allows, and no trust
in a stamp too young to be sure of."""

import threading
import time

import pytest

from curate.catalog import Catalog, JobNotFound
from curate.catalog_cache import CatalogCache
from schemas.job import JobSpec


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    catalog = Catalog(tmp_path / "catalog.duckdb", tmp_path)
    catalog.create_job(JobSpec(source="/src", job_id="a"))
    return catalog


def test_a_value_is_read_again_only_after_the_catalog_changed(catalog):
    cache = CatalogCache(catalog, racy_s=0)
    detail = lambda: catalog.job_detail("a")  # noqa: E731
    assert cache.get("a", detail)["status"] == "created"
    assert cache.get("a", detail)["status"] == "created"
    assert cache.reads == 1
    catalog.set_job_status("a", "running")
    assert cache.get("a", detail)["status"] == "running"
    assert cache.reads == 2


def test_a_stamp_too_young_to_trust_is_read_again(catalog):
    """As if every mtime were within a clock tick of now: no value outlives its request."""
    cache = CatalogCache(catalog, racy_s=3600)
    for _ in range(3):
        cache.get("a", lambda: catalog.job_detail("a"))
    assert cache.reads == 3


def test_errors_reach_the_caller_and_are_not_kept(catalog):
    cache = CatalogCache(catalog, racy_s=0)
    catalog.set_job_status("a", "done")
    assert cache.get("a", lambda: catalog.job_detail("a"))["status"] == "done"
    catalog.delete_job("a")
    for _ in range(2):
        with pytest.raises(JobNotFound):
            cache.get("a", lambda: catalog.job_detail("a"))
    assert cache.reads == 3


class Stamps:
    """A catalog stand-in whose stamp the test moves (old mtimes: always trusted)."""

    def __init__(self) -> None:
        self.version = 0

    def stamp(self) -> tuple:
        return ((1, self.version), None)


def test_concurrent_callers_share_one_read():
    stamps = Stamps()
    cache: CatalogCache[int] = CatalogCache(stamps)
    reading, release = threading.Event(), threading.Event()

    def slow_read() -> int:
        reading.set()
        assert release.wait(10)
        return 7

    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("k", slow_read))) for _ in range(8)
    ]
    threads[0].start()
    assert reading.wait(10)
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.05)  # let them reach the read in flight (a late one would still find the value)
    release.set()
    for thread in threads:
        thread.join(10)
    assert results == [7] * 8 and cache.reads == 1


def test_a_stale_value_only_within_max_stale_and_only_while_another_reads():
    stamps = Stamps()
    cache: CatalogCache[int] = CatalogCache(stamps)
    assert cache.get("k", lambda: 1) == 1
    stamps.version += 1  # the catalog changed: value 2 is current now
    reading, release = threading.Event(), threading.Event()

    def slow_read() -> int:
        reading.set()
        assert release.wait(10)
        return 2

    reader = threading.Thread(target=cache.get, args=("k", slow_read))
    reader.start()
    assert reading.wait(10)
    # While that read runs: a poll that allows staleness gets the last value at once...
    assert cache.get("k", lambda: 99, max_stale_s=60) == 1
    # ...one that does not waits for the read (it began on the stamp this caller sees).
    waiter: list[int] = []
    strict = threading.Thread(target=lambda: waiter.append(cache.get("k", lambda: 99)))
    strict.start()
    time.sleep(0.05)
    assert waiter == []
    release.set()
    reader.join(10)
    strict.join(10)
    assert waiter == [2] and cache.reads == 2

    # With nobody reading, even a stale-tolerant poll reads the change itself.
    stamps.version += 1
    assert cache.get("k", lambda: 3, max_stale_s=60) == 3
    # A value confirmed longer ago than max_stale_s is not served stale.
    stamps.version += 1
    reading.clear()
    release.clear()
    reader = threading.Thread(target=cache.get, args=("k", slow_read))
    reader.start()
    assert reading.wait(10)
    late: list[int] = []
    poll = threading.Thread(target=lambda: late.append(cache.get("k", lambda: 99, 1e-9)))
    poll.start()
    time.sleep(0.05)
    assert late == [], "the last value is older than the poll allows: it waits"
    release.set()
    reader.join(10)
    poll.join(10)
    assert late == [2]
