"""Seed sets: ingested once per registration and embedded once per (content, model), cached
under DATA_ROOT/seed_sets/<name>/ and shared by every job that names them.

The ingest cache is keyed by the registration (location and time of `curate seeds add`): a set
whose files changed is refreshed with `curate seeds add --replace`. The embedding cache is keyed
by that ingest, the set's content hash (its sorted image ids) and the model's fingerprint, so
every job with the same model embeds a registered set once.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from curate.catalog import Catalog
from curate.core import atomic, storage
from curate.core.shards import PartResult, shard_name, write_shard
from curate.core.stage import JobRun
from curate.core.storage import portable, read_table, resolve
from curate.stages.embed.embedder import EmbedInput
from curate.stages.embed.model import ModelSpec
from curate.stages.embed.stage import STAGE as EMBED
from curate.stages.embed.stage import EmbedInputs
from curate.stages.ingest.sources import detect_source
from curate.stages.ingest.stage import STAGE as INGEST
from curate.stages.retrieve.seed_sets import PolicyStep, SeedSet, SeedSetError, resolve_seed_sets
from schemas.job import EmbedOptions, IngestOptions
from schemas.shards import DEDUP

_COMPLETE = "complete.json"


@dataclass(frozen=True)
class LoadedSeedSet:
    """A seed set ready for retrieval: its ingest shards (the as-is images' bytes) and
    embeddings."""

    seed_set: SeedSet
    ingest: dict[int, Path]  # part -> INGEST shard
    embed: list[Path]  # EMBED shards
    images: int

    @property
    def name(self) -> str:
        return self.seed_set.name

    @property
    def policy(self) -> tuple[PolicyStep, ...]:
        return self.seed_set.policy


def _digest(*values: str) -> str:
    return hashlib.sha256("\0".join(values).encode()).hexdigest()[:16]


def _write_complete(folder: Path, manifest: dict) -> None:
    atomic.write_json(folder / _COMPLETE, manifest)


def _first_occurrences(shards: dict[int, str], out_dir: Path) -> dict[int, str]:
    """DEDUP-schema shards keeping each image's first occurrence in the set: a seed image stored
    twice is embedded and retrieved for once."""
    seen: set[str] = set()
    written = {}
    for part, path in sorted(shards.items()):
        table = read_table(path, ["image_id", "uri", "part", "item"])
        keep = []
        for image_id in table.column("image_id").to_pylist():
            keep.append(image_id not in seen)
            seen.add(image_id)
        n = table.num_rows
        decisions = pa.table(
            {
                **{name: table.column(name) for name in ("image_id", "uri", "part", "item")},
                "keep": pa.array(keep, pa.bool_()),
                "reason": pa.array([None if k else "exact" for k in keep], pa.string()),
                "group_id": pa.nulls(n, pa.string()),
                "duplicate_of": pa.nulls(n, pa.string()),
                "similarity": pa.nulls(n, pa.float32()),
            },
            schema=DEDUP,
        )
        written[part] = str(write_shard(decisions, out_dir / shard_name(part)).path)
    return written


def _ingest(seed_set: SeedSet, registered_at: str, job: JobRun) -> tuple[Path, dict]:
    """The set's ingest shards, ingesting it on first use (default ingest options)."""
    settings = job.settings
    folder = (
        settings.root
        / "seed_sets"
        / seed_set.name
        / ("ingest-" + _digest(seed_set.location, registered_at))
    )
    if storage.exists(folder / _COMPLETE):
        return folder, storage.read_json(folder / _COMPLETE)
    source = detect_source(seed_set.location)
    options = IngestOptions()
    results: list[PartResult] = []
    job.compute.map_parts(
        INGEST,
        (options, settings.crawl_settings(), folder),
        source.parts(options.shard_size),
        label=f"seeds {seed_set.name}: ingest",
        commit=results.append,
        total=source.parts_total(options.shard_size),
    )
    shards = {r.part: str(r.shards["data"].path) for r in results if "data" in r.shards}
    keep = _first_occurrences(shards, folder / "first")
    image_ids = sorted(
        {
            image_id
            for path in shards.values()
            for image_id in read_table(path, ["image_id"]).column(0).to_pylist()
        }
    )
    if not image_ids:
        raise SeedSetError(
            f"seed set {seed_set.name!r} at {seed_set.location} holds no usable images"
        )
    errors: dict[str, int] = {}
    for result in results:
        for reason, count in result.error_counts.items():
            errors[reason] = errors.get(reason, 0) + count
    root = settings.root
    manifest = {
        "location": seed_set.location,
        "shards": {str(part): portable(path, root) for part, path in sorted(shards.items())},
        "first": {str(part): portable(path, root) for part, path in sorted(keep.items())},
        "images": len(image_ids),
        "content": hashlib.sha256("\n".join(image_ids).encode()).hexdigest(),
        "errors_by_reason": errors,
    }
    _write_complete(folder, manifest)
    return folder, manifest


def _embed(
    seed_set: SeedSet,
    ingest_dir: Path,
    ingest: dict,
    model: ModelSpec,
    options: EmbedOptions,
    job: JobRun,
) -> list[Path]:
    settings = job.settings
    # EMBED rows point at (part, item) of one ingest: the key names that ingest, not only its
    # content, or a re-registration that moves images between parts would reuse stale rows.
    key = _digest(ingest["content"], ingest_dir.name, model.fingerprint(), str(options.image_size))
    folder = settings.root / "seed_sets" / seed_set.name / f"embed-{key}"
    root = settings.root
    if storage.exists(folder / _COMPLETE):
        return [resolve(p, root) for p in storage.read_json(folder / _COMPLETE)["shards"]]
    results: list[PartResult] = []
    inputs = [
        EmbedInput(int(part), resolve(path, root), resolve(ingest["first"][part], root))
        for part, path in ingest["shards"].items()
    ]
    job.compute.map_parts(
        EMBED,
        EmbedInputs(model, folder, options.batch_size, options.compile),
        inputs,
        label=f"seeds {seed_set.name}: embed",
        commit=results.append,
        total=len(inputs),
    )
    shards = sorted(r.shards["data"].path for r in results if "data" in r.shards)
    recorded = [portable(path, root) for path in shards]
    _write_complete(folder, {"model": model.fingerprint(), "shards": recorded})
    return shards


def check_seed_sets(names: list[str], catalog: Catalog) -> list[SeedSet]:
    """The named sets from the registry; raises SeedSetError before any work."""
    return resolve_seed_sets(names, catalog.seed_sets())


def load_seed_sets(job: JobRun, model: ModelSpec) -> list[LoadedSeedSet]:
    """The job's seed sets, ingested and embedded with `model` (cached across jobs)."""
    registered = job.catalog.seed_sets()
    loaded = []
    for seed_set in resolve_seed_sets(job.spec.seeds, registered):
        folder, ingest = _ingest(seed_set, registered[seed_set.name]["created_at"], job)
        embed = _embed(seed_set, folder, ingest, model, job.spec.embed, job)
        root = job.settings.root
        shards = {int(part): resolve(path, root) for part, path in ingest["shards"].items()}
        loaded.append(LoadedSeedSet(seed_set, shards, embed, ingest["images"]))
    return loaded
