"""The browse indexes of every job, as a long-lived process (the REST service) keeps them: built on
first use, re-checked against the catalog only after it changed, and the image bytes and
thumbnails read through them.

A request reads a few row groups of an index file (tables.py) and, for an image, one `pread`
(pages.py). The catalog (~15 ms to open, and shared with the drivers writing to it) is read only
when its files changed since the last check, by one request while the others go on with what
they have, and then at most once per `recheck_s` for a job at work, `settled_s` for one that
has ended.
"""

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from curate.browse import build, thumbs
from curate.browse.errors import ImageNotFound, ResultsNotFound
from curate.browse.pages import BinaryColumnReader, Unsupported
from curate.browse.queries import ResultsIndex
from curate.browse.results import build_results
from curate.browse.tables import OpenFiles
from curate.catalog import Catalog, JobNotFound
from curate.core import storage
from curate.settings import Settings
from schemas.errors import DataError

SETTLED = frozenset({"done", "failed", "cancelled"})


@dataclass(frozen=True)
class Location:
    """Where an image's bytes are: an ingest shard (the job's, or a seed set's) and its row."""

    job_id: str
    image_id: str
    path: Path
    row: int
    format: str
    uri: str
    source: str  # "crawl", or the seed set's name


@dataclass
class _Job:
    inputs: build.JobInputs
    checked: float
    stamp: tuple
    results: ResultsIndex | None = None
    locations: list[tuple[str, Path, Path]] | None = None
    locations_error: DataError | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class Browser:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        thumb_dir: Path | None = None,
        recheck_s: float = 1.0,
        settled_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.thumb_dir = thumb_dir or settings.thumb_dir
        self.recheck_s = recheck_s
        self.settled_s = settled_s
        self._jobs: dict[str, _Job] = {}
        self._job_ids: tuple[tuple, float, list[str]] | None = None
        self._lock = threading.Lock()
        # One query thread each: many requests at once share the cores better than one query
        # spreading over all of them. Index files never change under a name: cache footers.
        self._db = duckdb.connect(config={"threads": 1})
        self._db.execute("SET parquet_metadata_cache = true")
        self._images = BinaryColumnReader("image.bytes")
        self._files = OpenFiles()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for one request's queries (cursors of one connection run concurrently)."""
        return self._db.cursor()

    # -- jobs and their indexes ------------------------------------------------------------------

    def _read_inputs(self, job_id: str) -> build.JobInputs:
        raw = self.catalog.browse_inputs(job_id)
        return build.JobInputs(
            job_id=job_id,
            job_dir=self.settings.job_dir(job_id),
            data_root=self.settings.root,
            spec=raw["spec"],
            status=raw["status"],
            stages=raw["stages"],
            shards=raw["shards"],
        )

    def _job(self, job_id: str) -> _Job:
        """The job's entry, its inputs re-read when the catalog changed since (raises
        JobNotFound for an unknown id): at most every `recheck_s` for a job at work, every
        `settled_s` for one that has ended (what changes it then is a resume or a delete)."""
        now, stamp = time.monotonic(), self.catalog.stamp()
        with self._lock:
            job = self._jobs.get(job_id)
            # A deleted job's folder goes with it: then no answer from the cached entry.
            if job is not None and storage.folder_exists(job.inputs.job_dir):
                wait = self.settled_s if job.inputs.status in SETTLED else self.recheck_s
                if job.stamp == stamp or now - job.checked < wait:
                    return job
                # This request re-reads; the others keep the entry meanwhile, not queue on the
                # catalog behind it.
                job.checked = now
            elif job is not None:
                self._jobs.pop(job_id)
        try:
            inputs = self._read_inputs(job_id)
        except JobNotFound:
            with self._lock:
                self._jobs.pop(job_id, None)  # deleted: no answer from its old index
            raise
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.inputs != inputs:
                job = self._jobs[job_id] = _Job(inputs, now, stamp)
            else:
                job.checked, job.stamp = now, stamp
            return job

    def job_dir(self, job_id: str) -> Path:
        return self._job(job_id).inputs.job_dir

    def results(self, job_id: str) -> ResultsIndex:
        """The job's results index, built on first use."""
        job = self._job(job_id)
        if job.results is not None:
            return job.results
        inputs = job.inputs
        with job.lock:
            if job.results is None:
                key = build.results_key(inputs)
                if key is None:
                    stages = ", ".join(f"{s} {st}" for s, st in inputs.stages.items()) or "none"
                    raise ResultsNotFound(
                        f"job {job_id!r} has no results yet: none of dedup, cluster, retrieve "
                        f"is done (stages: {stages})"
                    )
                folder = build.publish_index(
                    inputs.job_dir / build.BROWSE_DIR,
                    key,
                    lambda tmp: build_results(inputs, tmp),
                )
                job.results = ResultsIndex(job_id, folder)
        return job.results

    def locations(self, job_id: str) -> list[tuple[str, Path, Path]]:
        """(source, ingest shard, location index) of every shard holding the job's images, their
        indexes built on first use (only the new shards' when the job has committed parts)."""
        job = self._job(job_id)
        if job.locations is None:
            with job.lock:
                if job.locations_error is not None:
                    # Known broken for these inputs: not read again on every request.
                    raise job.locations_error
                if job.locations is None:
                    sources = build.location_sources(job.inputs)
                    for _, shard, index in sources:
                        try:
                            build.shard_locations(shard, index)
                        except (OSError, duckdb.Error, pa.ArrowException) as error:
                            job.locations_error = DataError(
                                f"ingest shard {shard} of job {job_id!r} cannot be read: {error}",
                                code="shard_unreadable",
                            )
                            raise job.locations_error from None
                    job.locations = sources
        return job.locations

    def warm(self, job_id: str) -> bool:
        """Build the job's indexes now, ahead of its first request (services/api/warm.py does
        this in the background for jobs that have ended): the results index with its cluster
        cards in memory, and every location index. False while this Browser still sees the
        job at work (its entry predates the end): then try again later."""
        if self._job(job_id).inputs.status not in SETTLED:
            return False
        try:
            index = self.results(job_id)
        except ResultsNotFound:
            pass  # no result stage done: nothing to browse, but its images can be shown
        else:
            if "clusters" in index.meta["tables"]:
                index.clusters()
        self.locations(job_id)
        return True

    def _candidate_jobs(self) -> list[str]:
        """Jobs that may hold an image: the ended ones newest first, then those at work (whose
        location indexes grow with every part); re-read like a job's inputs."""
        now, stamp = time.monotonic(), self.catalog.stamp()
        with self._lock:
            cached = self._job_ids
            stale = cached is None or (cached[0] != stamp and now - cached[1] >= self.recheck_s)
            if stale and cached is not None:
                self._job_ids = (cached[0], now, cached[2])  # one request re-reads
        if stale:
            jobs = self.catalog.browse_job_ids()
            ordered = [j for j, status in jobs if status in SETTLED]
            ordered += [j for j, status in jobs if status not in SETTLED]
            cached = self._job_ids = (stamp, now, ordered)
        assert cached is not None
        return cached[2]

    # -- images ----------------------------------------------------------------------------------

    def _locate_in(self, job_id: str, image_id: str) -> Location | None:
        # In order: the crawl's earliest part that has it, then the seed sets.
        for source, shard, index in self.locations(job_id):
            if not self._files.prefixes(index, "image_id").may_hold(image_id):
                continue
            rows = self._files.sorted(index, "image_id").find(image_id, ["row", "format", "uri"])
            if rows:
                row = rows[0]
                return Location(
                    job_id, image_id, shard, int(row["row"]), row["format"], row["uri"], source
                )
        return None

    def locate(self, image_id: str, job_id: str | None = None) -> Location:
        """Where the image's bytes are: in `job_id`, or else in the newest ended job that holds
        it, then in the jobs at work."""
        if not thumbs.is_image_id(image_id):
            raise ImageNotFound(f"{image_id!r} is not an image id (64 hex digits)")
        if job_id is not None:
            found = self._locate_in(job_id, image_id)
            if found is None:
                raise ImageNotFound(f"job {job_id!r} has no image {image_id}")
            return found
        for candidate in self._candidate_jobs():
            try:
                found = self._locate_in(candidate, image_id)
            except DataError:
                continue  # a job whose shards are damaged does not hide the others' images
            if found is not None:
                return found
        raise ImageNotFound(f"no job holds image {image_id}")

    def original(self, location: Location) -> bytes:
        """The image's original bytes, checked against its id (the SHA-256 of those bytes)."""
        try:
            # On an object store root, the shard's copy in this node's mirror: a value costs
            # a thousand 4-byte reads the first time, which must be local.
            path = storage.fetch(location.path)
        except OSError:
            path = location.path
        try:
            data = self._images.read(path, location.row)
        except (Unsupported, OSError, IndexError, pa.ArrowException):
            data = None
        if data is None or hashlib.sha256(data).hexdigest() != location.image_id:
            # Not the layout pages.py reads (or a shard rewritten since): the ordinary way.
            data = _read_row(path, location.row)
        if data is None or hashlib.sha256(data).hexdigest() != location.image_id:
            raise DataError(
                f"the bytes of image {location.image_id} in {location.path} (row "
                f"{location.row}) are missing or damaged",
                code="image_unreadable",
            )
        return data

    def image(self, image_id: str, job_id: str | None = None) -> tuple[bytes, str]:
        """The original bytes and their content type."""
        location = self.locate(image_id, job_id)
        return self.original(location), thumbs.media_type(location.format)

    def thumbnail(self, image_id: str, job_id: str | None = None) -> Path:
        """The thumbnail file, made on first request and served from disk after."""
        if not thumbs.is_image_id(image_id):
            raise ImageNotFound(f"{image_id!r} is not an image id (64 hex digits)")
        path = thumbs.thumbnail_path(self.thumb_dir, image_id)
        if path.exists():
            return path
        location = self.locate(image_id, job_id)
        return thumbs.cached_thumbnail(self.thumb_dir, image_id, self.original(location))


def _read_row(path: Path, row: int) -> bytes | None:
    """One row's image bytes through pyarrow: reads the whole row group's image column."""
    try:
        parquet = pq.ParquetFile(path)
        start = 0
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if row < start + rows:
                column = parquet.read_row_group(group, columns=["image"]).column(0)
                value = column[row - start].as_py()
                return value.get("bytes") if value else None
            start += rows
    except (OSError, pa.ArrowException):
        return None
    return None
