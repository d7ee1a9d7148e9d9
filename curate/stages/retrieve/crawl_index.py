"""The crawl's kNN index, sharded by id range: one quantizer trained once, the crawl's embed
shards cut into runs of about equal rows, each run indexed and searched by a worker of its own.

    plan_crawl_index    one task: count the rows, cut the runs, train the empty index (exact
                        below `flat_max` images, IVF-PQ above, sized for the whole crawl) and save
                        it as `trained.index`
    open_index_shard    once per shard, on its searcher: load `crawl-<s>.index` and its keys, or
                        build them first (a copy of the trained index, the run's vectors added)
    write_manifest      the driver, once every shard is there: `crawl_index.json`

Every shard starts from the same trained index, so an IVF-PQ query probes the same lists and
scores the same PQ codes in every shard; each shard re-ranks a shortlist of its own rows, and
their union holds the single index's shortlist (a row in the k' best of all rows is in the k'
best of its own shard's). Merged by exact cosine, the sharded result is therefore the single
index's or better, rank by rank; the exact index gives identical results however it is cut.

Resume: the trained index is kept once saved (shards built before a crash share its quantizer
with those built after), and a shard's files are written keys first, index last, each whole or
not at all: a shard whose index file is stored is complete and is loaded, never rebuilt.
"""

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import pyarrow as pa

from curate.core import storage
from curate.core.atomic import write_json
from curate.core.knn_index import KnnIndex
from curate.core.shards import ShardWriter
from curate.core.stage import Compute, LocalPool, ShardPool, Worker
from curate.core.vectors import iter_embeddings, read_embeddings
from curate.stages.retrieve.knn_search import CrawlKeys, IndexShard, combined_description
from schemas.job import INDEX_SHARD_ROWS

log = logging.getLogger(__name__)

TRAINED = "trained.index"
MANIFEST = "crawl_index.json"
KEYS = pa.schema([("image_id", pa.string()), ("part", pa.int32()), ("item", pa.int32())])


@dataclass(frozen=True)
class IndexOptions:
    """The retrieve section's index settings (schemas.job.RetrieveOptions)."""

    flat_max: int
    nlist: int | None
    pq_m: int | None
    nprobe: int | None
    seed: int
    min_seeds: int
    shards: int | None = None  # None: one per shard_rows images
    shard_rows: int = INDEX_SHARD_ROWS


@dataclass(frozen=True)
class IndexShardSpec:
    """Shard `number` of the crawl index: the embed shards it indexes (a run of the crawl's),
    their rows, and the folder of the index's files."""

    number: int
    embed: tuple[Path, ...]
    rows: int
    index_dir: Path

    @property
    def index_path(self) -> Path:
        return self.index_dir / f"crawl-{self.number:05d}.index"

    @property
    def keys_path(self) -> Path:
        return self.index_dir / f"crawl-{self.number:05d}.keys.parquet"


def shard_count(rows: int, options: IndexOptions) -> int:
    """Index shards for a crawl of `rows` images: as asked, else one per `shard_rows`."""
    return options.shards or max(1, math.ceil(rows / options.shard_rows))


def split_by_rows(rows: Sequence[int], groups: int) -> list[range]:
    """Cut a sequence of files of `rows` rows into at most `groups` runs of consecutive files,
    each at least one file long, their row sums as even as whole files allow."""
    n = len(rows)
    groups = max(1, min(groups, n))
    total = sum(rows)
    cumulative = [0]
    for count in rows:
        cumulative.append(cumulative[-1] + count)
    bounds = [0]
    for g in range(1, groups):
        end = bounds[-1] + 1
        # Grow the run until it reaches its share, leaving a file for each run still to cut.
        while end < n - (groups - g) and cumulative[end] < total * g / groups:
            end += 1
        bounds.append(end)
    bounds.append(n)
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def plan_crawl_index(
    embed: Sequence[Path], index_dir: Path, options: IndexOptions
) -> list[IndexShardSpec]:
    """The shards of the crawl index, with the trained empty index saved for them to copy.

    Runs where FAISS training should (a whole node, a GPU when there is one); the trained index
    is kept if already saved."""
    embed = [Path(p) for p in embed]
    counts = [storage.parquet_file(p).metadata.num_rows for p in embed]  # footers only
    total = sum(counts)
    if total == 0:
        raise ValueError("nothing to search: the embed stage produced no embeddings")
    runs = split_by_rows(counts, shard_count(total, options))
    trained = index_dir / TRAINED
    if not storage.exists(trained):
        # The dimension from the first non-empty shard: a part whose images all failed has none.
        first = next(batch for batch in iter_embeddings(embed) if len(batch))
        index = KnnIndex.create(
            first.vectors.shape[1],
            total,  # sized for the whole crawl: every shard shares the lists and codebooks
            flat_max=options.flat_max,
            nlist=options.nlist,
            pq_m=options.pq_m,
            nprobe=options.nprobe,
        )
        if index.needs_training:
            # The index says how many training vectors its lists need (64 per list).
            sample = read_embeddings(embed, sample=index.train_size, seed=options.seed)
            index.train(sample.vectors)
        index.save(trained)  # atomic
    return [
        IndexShardSpec(s, tuple(embed[i] for i in run), sum(counts[i] for i in run), index_dir)
        for s, run in enumerate(runs)
    ]


def open_index_shard(spec: IndexShardSpec, worker: Worker | None = None) -> IndexShard:
    """Shard `spec.number` of the crawl index, built first if it is not stored yet.

    worker: where it runs (a shard pool's worker): FAISS gets its cores, or its GPU. None: this
    process as it is (FAISS's threads untouched, a GPU when FAISS sees one)."""
    gpu = None if worker is None else worker.gpu
    if worker is not None and not worker.gpu:
        faiss.omp_set_num_threads(max(1, worker.cpus))
    if storage.exists(spec.index_path) and storage.exists(spec.keys_path):
        keys = storage.read_table(spec.keys_path)
        index = KnnIndex.load(spec.index_path, gpu=gpu)
        return IndexShard(index, CrawlKeys.from_table(keys), spec.number)
    index = KnnIndex.load(spec.index_dir / TRAINED, gpu=gpu)
    tables = []
    # Keys first: the index file, written last, is what marks the shard complete.
    with ShardWriter(spec.keys_path, KEYS) as writer:
        for embedded in iter_embeddings(spec.embed):
            index.add(embedded.vectors)
            table = pa.table(
                {
                    "image_id": embedded.image_ids,
                    "part": pa.array(embedded.parts, pa.int32()),
                    "item": pa.array(embedded.items, pa.int32()),
                },
                schema=KEYS,
            )
            writer.write(table)
            tables.append(table)
    index.save(spec.index_path)  # atomic
    log.info("crawl index shard %d: %d vectors", spec.number, index.ntotal)
    keys = pa.concat_tables(tables) if tables else KEYS.empty_table()
    return IndexShard(index, CrawlKeys.from_table(keys), spec.number)


def write_manifest(index_dir: Path, specs: Sequence[IndexShardSpec], described: dict) -> None:
    """`crawl_index.json`, written once every shard is stored: the index's description and its
    shards' files, which is all a reader needs to open them."""
    shards = [
        {
            "number": s.number,
            "rows": s.rows,
            "index": s.index_path.name,
            "keys": s.keys_path.name,
        }
        for s in specs
    ]
    write_json(index_dir / MANIFEST, {"index": described, "shards": shards})


def read_manifest(index_dir: Path) -> dict | None:
    path = index_dir / MANIFEST
    if not storage.exists(path):
        return None
    return json.loads(storage.fetch(path).read_text())


def stored_shards(index_dir: Path) -> list[IndexShardSpec]:
    """The shards a complete index's manifest lists (nothing left to build: no embed shards)."""
    manifest = read_manifest(index_dir)
    if manifest is None:
        raise FileNotFoundError(f"no crawl index in {index_dir}: {MANIFEST} is not there")
    return [IndexShardSpec(s["number"], (), s["rows"], index_dir) for s in manifest["shards"]]


def build_crawl_index(embed: Sequence[Path], index_dir: Path, options: IndexOptions) -> dict:
    """The whole index built in this process, shard after shard (tests, benchmarks; the stage
    builds its shards in parallel, `open_crawl_index`); kept if present. Its description."""
    manifest = read_manifest(index_dir)
    if manifest is not None:
        return manifest["index"]
    specs = plan_crawl_index(embed, index_dir, options)
    # Each shard is dropped once described: one shard in memory at a time.
    described = combined_description([open_index_shard(s).describe() for s in specs])
    write_manifest(index_dir, specs, described)
    return described


def local_shards(index_dir: Path) -> LocalPool:
    """Every shard of a stored index, loaded in this process (a part step given no pool)."""
    return LocalPool([open_index_shard(spec) for spec in stored_shards(index_dir)])


def open_crawl_index(
    compute: Compute,
    label: str,
    embed: Sequence[Path],
    index_dir: Path,
    options: IndexOptions,
    *,
    search: bool = True,
) -> tuple[ShardPool | None, dict]:
    """The stage's crawl index: trained in one task, then one searcher per shard, each building
    its shard in parallel (or loading it once built), on a share of a GPU when the cluster has
    them. Returns the pool of searchers and the index's description.

    search=False (every kNN part already committed): no searcher is started when the index is
    complete, only its description read."""
    manifest = read_manifest(index_dir)
    if manifest is not None:
        if not search:
            return None, manifest["index"]
        specs = stored_shards(index_dir)
    else:
        specs = compute.task(label, plan_crawl_index, list(embed), index_dir, options)
    pool = compute.shard_pool(label, open_index_shard, specs, gpu=True)
    described = combined_description(pool.map("describe"))
    if manifest is None:
        write_manifest(index_dir, specs, described)
    return pool, described
