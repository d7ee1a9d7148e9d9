"""Browse indexes built when a job ends, so that its first results request does not build them.

Building a job's browse indexes (curate/browse: the results index, one location index per ingest
shard) takes seconds at 100,000 images (bench/service.py); built on first use, the person who
opens the job's clusters first waits for it. `IndexWarmer` is one background thread of the
service that looks at the catalog's jobs whenever the catalog changed (at most every `poll_s`)
and builds the indexes of every job that has ended and was not warmed in that state: a job that
ends while the service runs (its own drivers, a `curate run` from a shell, a Ray job) and, when
the service starts, the jobs that ended before. Newest jobs first. What it builds is what a
request would have built, through the same `Browser`; a request that comes first builds it
itself (the lazy path stays) and the warmer then finds it done.

A job whose indexes cannot be built (a damaged shard) is logged and left to its requests, which
answer with the error; it is not retried until the job changes.
"""

import logging
import threading
from typing import Any

from curate.browse.store import SETTLED, Browser
from curate.catalog import Catalog
from schemas.errors import CurateError

log = logging.getLogger("curate.api.warm")


class IndexWarmer:
    def __init__(self, browser: Browser, catalog: Catalog, poll_s: float = 2.0) -> None:
        self.browser = browser
        self.catalog = catalog
        self.poll_s = poll_s
        # job id -> the job's last change (list_jobs' updated_at) when it was warmed.
        self.warmed: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-warmer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the build in progress, if any (a build is not interrupted half way)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        seen: tuple | None = None
        while not self._stop.is_set():
            stamp = self.catalog.stamp()
            if stamp != seen:
                try:
                    if self.warm_ended_jobs():
                        seen = stamp
                except Exception:  # the catalog unreadable for now: the next poll tries again
                    log.exception("could not look for jobs to warm")
            self._stop.wait(self.poll_s)

    def warm_ended_jobs(self) -> bool:
        """Build the indexes of every ended job not warmed in its current state; True when
        none is left to do (False: a job's end is not yet seen by the Browser, or stopped)."""
        complete = True
        for job in self.catalog.list_jobs():
            job_id, changed = job["job_id"], job["updated_at"]
            if job["status"] not in SETTLED or self.warmed.get(job_id) == changed:
                continue
            if self._stop.is_set():
                return False
            try:
                if not self.browser.warm(job_id):
                    complete = False
                    continue
            except CurateError as error:  # deleted meanwhile, or shards that cannot be read
                log.warning("browse indexes of job %s not built: %s", job_id, error)
            except Exception:  # a bug: its requests will show it; no retry every poll
                log.exception("browse indexes of job %s not built", job_id)
            self.warmed[job_id] = changed
        return complete
