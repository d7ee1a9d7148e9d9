"""Dedup, second pass: from every image's hash features and copy descriptor, decide which
images stay. Exact repeats, then PCA-hash near duplicates, then copies, then copies of
evaluation images; each removed image names what it duplicates.

One task decides for the whole job (groups span shards), so it never holds the job's vectors:
the feature shards are streamed one at a time, the hash pass keeps 8-16 bytes of code per image
(the PCA basis is fitted on a seeded sample of `pca_sample` images), and the copy pass reads
every image's float16 descriptor into a memory-mapped scratch file that the kNN graph reads
block by block. What remains per image is its id, area and decision. The two searches can fan
out (`map_tables`, `map_slices`): the multi-index tables and the query slices are independent
units, and the decisions do not depend on how they are run.
"""

import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from curate.core.shards import PartResult, ShardRef, shard_name, write_shard
from curate.core.storage import read_table
from curate.stages.dedup.features import list_matrix
from curate.stages.dedup.grouping import connected_components, representatives
from curate.stages.dedup.knn_graph import MapSlices, contamination, copy_edges
from curate.stages.dedup.model_card import ModelCard, Thresholds, resolve_thresholds
from curate.stages.dedup.pca_hash.basis import PCAHasher
from curate.stages.dedup.pca_hash.search import near_duplicate_pairs, search_radii
from curate.stages.dedup.pca_hash.tables import MapTables
from schemas.job import DedupOptions
from schemas.shards import DEDUP, DEDUP_FEATURES

PCA_BASIS = "pca_hash.npz"
FIT_SEED = 0  # the PCA sample and the ITQ start: a re-run fits the same basis


@dataclass
class EvalSet:
    name: str
    image_ids: list[str]
    descriptors: np.ndarray  # [M, 512], L2-normalised


@dataclass
class Decisions:
    """Per distinct image, in source order: why it goes, and which image it points to."""

    image_ids: np.ndarray  # object
    first_part: np.ndarray  # where the image first occurs; later occurrences are exact repeats
    first_item: np.ndarray
    occurrences: np.ndarray  # int64: how often the image occurs in the ingest shards
    reason: np.ndarray  # object: None | "pca_hash" | "copy" | "eval_contamination"
    duplicate_of: np.ndarray  # object: image_id, "<eval set>:<image_id>" or None
    group: np.ndarray  # int64: index of the final representative
    similarity: np.ndarray  # float32
    metrics: dict = field(default_factory=dict)

    def positions(self, image_ids: list[str]) -> np.ndarray:
        lookup = {image_id: i for i, image_id in enumerate(self.image_ids)}
        return np.array([lookup[i] for i in image_ids], dtype=np.int64)


class _Images(NamedTuple):
    """The distinct images of a job in source order, and where each one's feature row is."""

    table: pa.Table  # image_id, part, item, area
    shard: np.ndarray  # int64: index of the feature shard holding the image's row
    row: np.ndarray  # int64: the row within that shard


_KEYS = ["image_id", "part", "item", "area"]


def _distinct_images(feature_shards: list[Path]) -> _Images:
    """Only the small columns are read here: the vectors are streamed shard by shard later."""
    tables = []
    for shard, path in enumerate(feature_shards):
        table = read_table(path, _KEYS)
        tables.append(
            table.append_column(
                "shard", pa.array(np.full(table.num_rows, shard, np.int64))
            ).append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        )
    if not tables:
        empty = DEDUP_FEATURES.empty_table().select(_KEYS)
        return _Images(empty, np.zeros(0, np.int64), np.zeros(0, np.int64))
    table = pa.concat_tables(tables).sort_by([("part", "ascending"), ("item", "ascending")])
    # An image stored in several ingest shards has a feature row in each: keep the first.
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)
    table = table.take(pa.array(np.sort(first)))
    return _Images(
        table.select(_KEYS), table.column("shard").to_numpy(), table.column("row").to_numpy()
    )


def _vectors_by_shard(
    feature_shards: list[Path],
    images: _Images,
    wanted: np.ndarray,
    column: str,
    dtype: type,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(k, vectors of images wanted[k]) one feature shard at a time: memory holds one shard's
    column, never the job's. Every wanted image is yielded once; shards without one are not read.
    """
    shard_of = images.shard[wanted]
    by_shard = np.argsort(shard_of, kind="stable")
    bounds = np.searchsorted(shard_of[by_shard], np.arange(len(feature_shards) + 1))
    for shard, path in enumerate(feature_shards):
        k = by_shard[bounds[shard] : bounds[shard + 1]]
        if k.size == 0:
            continue
        values = read_table(path, [column]).column(0).take(images.row[wanted[k]])
        if values.null_count:
            raise ValueError(
                f"{path} has images without {column} where other parts have it: the feature "
                "shards were made with different settings (did CURATE_COPY_WEIGHTS change while "
                "the job was resumed?)"
            )
        yield k, list_matrix(values, dtype)


def _hash_features(
    feature_shards: list[Path], images: _Images, wanted: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    return _vectors_by_shard(feature_shards, images, wanted, "hash_features", np.float32)


def _has_descriptors(feature_shards: list[Path]) -> bool:
    """Whether the copy pass ran: all shards agree (checked while streaming), so one tells."""
    for path in feature_shards:
        column = read_table(path, ["copy_descriptor"]).column(0)
        if len(column):
            return column.null_count < len(column)
    return False


def _occurrences(ingest_shards: list[Path], image_ids: np.ndarray) -> np.ndarray:
    counts: dict[str, int] = {}
    for path in ingest_shards:
        for image_id in read_table(path, ["image_id"]).column(0).to_pylist():
            counts[image_id] = counts.get(image_id, 0) + 1
    return np.array([counts[i] for i in image_ids], dtype=np.int64)


def _fitted_hasher(
    feature_shards: list[Path], images: _Images, options: DedupOptions, dim: int
) -> PCAHasher:
    """The job's PCA basis, fitted on a seeded sample streamed from the shards: the same sample
    and so the same basis as `PCAHasher.fit` on the whole feature matrix in source order."""
    n = images.table.num_rows
    bits = options.hash_bits
    # Estimating `bits` whitened principal axes needs a sample well above `bits`: from fewer,
    # the last axes are noise that whitening blows up to a full say in every bit.
    if min(n, options.pca_sample) <= 2 * bits:
        return PCAHasher.dct_signs(dim, bits)
    sample = np.arange(n)
    if n > options.pca_sample:
        chosen = np.random.default_rng(FIT_SEED).choice(n, options.pca_sample, replace=False)
        sample = np.sort(chosen)
    features = np.empty((sample.size, dim), np.float32)
    for k, vectors in _hash_features(feature_shards, images, sample):
        features[k] = vectors
    return PCAHasher.fit(
        features,
        bits=bits,
        itq_iterations=options.itq_iterations,
        seed=FIT_SEED,
        sample_size=options.pca_sample,
    )


def _hash_codes(
    feature_shards: list[Path], images: _Images, options: DedupOptions, out_dir: Path
) -> np.ndarray:
    """Packed hash codes of the distinct images, uint8 [N, bits // 8], streamed shard by shard:
    8-16 bytes an image are held, not the 572-byte float features."""
    n = images.table.num_rows
    everyone = np.arange(n)
    first = read_table(feature_shards[images.shard[0]], ["hash_features"]).column(0)
    dim = len(first[int(images.row[0])])
    if options.hash == "phash":
        codes = np.zeros((n, -(-dim // 8)), np.uint8)
        for k, bits in _hash_features(feature_shards, images, everyone):
            codes[k] = np.packbits(bits > 0.5, axis=1)
        return codes
    hasher = _fitted_hasher(feature_shards, images, options, dim)
    out_dir.mkdir(parents=True, exist_ok=True)
    hasher.save(out_dir / PCA_BASIS)
    codes = np.zeros((n, hasher.bits // 8), np.uint8)
    for k, vectors in _hash_features(feature_shards, images, everyone):
        codes[k] = hasher.codes(vectors)
    return codes


def _copy_descriptors(
    feature_shards: list[Path], images: _Images, wanted: np.ndarray, scratch: Path | None
) -> np.ndarray:
    """Copy descriptors of images `wanted`, float16 [len(wanted), D], in an unnamed file mapped
    into memory: the kNN graph reads it block by block, so the task's memory holds the index,
    not 1 KiB an image; a killed task leaves no file behind."""
    vectors = _vectors_by_shard(feature_shards, images, wanted, "copy_descriptor", np.float16)
    descriptors: np.ndarray | None = None
    for k, block in vectors:
        if descriptors is None:
            shape = (len(wanted), block.shape[1])
            if scratch is None:
                descriptors = np.empty(shape, np.float16)
            else:
                scratch.mkdir(parents=True, exist_ok=True)
                backing = tempfile.TemporaryFile(dir=scratch)
                descriptors = np.memmap(backing, dtype=np.float16, mode="w+", shape=shape)
        descriptors[k] = block
    assert descriptors is not None, "images are wanted, so some shard holds their descriptors"
    return descriptors


def copy_groups(
    group: np.ndarray, left: np.ndarray, right: np.ndarray, area: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """Each image's representative once copy edges join hash groups: `group` holds each image's
    hash-group representative, (left, right) copy edges between any two images. A hash group is
    one picture in several files, so two pictures are copies when a file of one is a copy of a
    file of the other; the joined group keeps its largest representative."""
    joined = connected_components(len(group), group[left], group[right])
    kept = np.flatnonzero(group == np.arange(len(group)))
    local = representatives(joined[kept], area[kept], order[kept])
    final = group.copy()
    final[kept] = kept[local]
    return final[final]  # hash duplicates follow their representative into its new group


def _hamming(codes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.unpackbits(codes[a] ^ codes[b], axis=1).sum(axis=1)


def _unset(values: np.ndarray) -> np.ndarray:
    return np.array([v is None for v in values], dtype=bool)


def decide(
    ingest_shards: list[Path],
    feature_shards: list[Path],
    options: DedupOptions,
    eval_sets: list[EvalSet],
    out_dir: Path,
    *,
    scratch: Path | None = None,
    copy_background: np.ndarray | None = None,
    background_beta: float = 1.0,
    map_tables: MapTables | None = None,
    map_slices: MapSlices | None = None,
    slice_rows: int | None = None,
    thresholds: Thresholds | None = None,
) -> Decisions:
    """Every dedup decision of a job, streaming its feature shards.

    scratch: a local folder for the copy descriptors as a memory-mapped file (None: in
    memory). copy_background: descriptors of unrelated images; when given, copy edges are
    SSCD-normalised against them (cosine minus the pair's background level) and
    the copy threshold applies to the normalised score. map_tables: how the PCA-hash
    search runs its independent multi-index tables (`near_duplicate_pairs`); map_slices,
    slice_rows: how the copy graph's query slices are searched (`copy_edges`): e.g. as Ray
    tasks. Neither changes a decision. thresholds: the copy and eval-set cosines, resolved from
    the options and the copy model's card (`model_card.resolve_thresholds`); None: the options',
    DINOv2's where they leave one unset.
    """
    if thresholds is None:
        thresholds = resolve_thresholds(options.copy_threshold, options.eval_threshold, ModelCard())
    images = _distinct_images(feature_shards)
    n = images.table.num_rows
    ids = np.asarray(images.table.column("image_id").to_pylist(), dtype=object)
    area = images.table.column("area").to_numpy()
    order = np.arange(n)
    reason = np.full(n, None, dtype=object)
    duplicate_of = np.full(n, None, dtype=object)
    similarity = np.ones(n, dtype=np.float32)
    group = order.copy()
    metrics: dict = {"images": n}

    if n:
        # Pass 1: near duplicates, by Hamming distance between hash codes.
        codes = _hash_codes(feature_shards, images, options, out_dir)
        radius, word_radius = search_radii(options)
        left, right, _ = near_duplicate_pairs(
            codes, radius, map_tables=map_tables, word_radius=word_radius
        )
        group = representatives(connected_components(n, left, right), area, order)
        hashed = group != order
        reason[hashed] = "pca_hash"
        distance = _hamming(codes, order[hashed], group[hashed])
        similarity[hashed] = 1 - distance / (codes.shape[1] * 8)
        metrics["hash_pairs"] = int(len(left))
        del codes

    if not (n and _has_descriptors(feature_shards)):
        metrics["copy_detection"] = "skipped: no copy-descriptor weights"
    else:
        # Pass 2: copies between the pictures the hash pass kept, by cosine between the copy
        # descriptors of all their files. Comparing each group's representative alone lost most
        # geometric copies: the largest file of a group is often its padded copy, whose borders
        # the descriptor sees (bench/copybench: hard-geometric recall 0.06 after the hash pass,
        # the copy model alone 0.39).
        thresholds = thresholds.at_scale(n, sum(len(e.image_ids) for e in eval_sets))
        descriptors = _copy_descriptors(feature_shards, images, order, scratch)
        left, right, _ = copy_edges(
            descriptors,
            k=options.copy_k,
            threshold=thresholds.copy,
            background=copy_background,
            beta=background_beta,
            map_slices=map_slices,
            slice_rows=slice_rows,
        )
        group = copy_groups(group, left, right, area, order)
        copied = _unset(reason) & (group != order)
        reason[copied] = "copy"
        similarity[copied] = np.einsum(
            "ij,ij->i",
            descriptors[copied].astype(np.float32),
            descriptors[group[copied]].astype(np.float32),
        )
        metrics["copy_edges"] = int(len(left))
        metrics |= thresholds.metrics()

        # Pass 3: what is still kept and sits in one component with an evaluation image.
        for eval_set in eval_sets:
            kept = np.flatnonzero(_unset(reason))
            crawl, evaluation, sims = contamination(
                descriptors[kept],
                eval_set.descriptors,
                threshold=thresholds.eval,
                k=options.copy_k,
            )
            hit = kept[crawl]
            reason[hit] = "eval_contamination"
            duplicate_of[hit] = [f"{eval_set.name}:{eval_set.image_ids[e]}" for e in evaluation]
            similarity[hit] = sims

    merged = ~_unset(reason) & _unset(duplicate_of)
    duplicate_of[merged] = ids[group[merged]]
    occurrences = _occurrences(ingest_shards, ids)
    metrics["occurrences"] = int(occurrences.sum())
    removed = {"exact": int(occurrences.sum() - n)}
    for why in ("pca_hash", "copy", "eval_contamination"):
        removed[why] = int((reason == why).sum())
    metrics["removed"] = removed
    metrics["kept"] = int(_unset(reason).sum())
    return Decisions(
        image_ids=ids,
        first_part=images.table.column("part").to_numpy(),
        first_item=images.table.column("item").to_numpy(),
        occurrences=occurrences,
        reason=reason,
        duplicate_of=duplicate_of,
        group=group,
        similarity=similarity,
        metrics=metrics,
    )


def write_decisions(shard: ShardRef, decisions: Decisions, out_dir: Path) -> PartResult:
    """The dedup shard of one ingest shard: a row per occurrence, kept or not, and why."""
    started = time.perf_counter()
    part = shard.index
    rows = read_table(shard.path, ["image_id", "uri", "part", "item"])
    image_ids = rows.column("image_id").to_pylist()
    at = decisions.positions(image_ids)
    items = rows.column("item").to_numpy()
    exact = (decisions.first_part[at] != part) | (decisions.first_item[at] != items)
    reason = np.where(exact, "exact", decisions.reason[at])
    group = decisions.group[at]
    # A group is worth naming when it holds more than one occurrence, repeats included.
    size = np.bincount(decisions.group, weights=decisions.occurrences)
    named = size[group] > 1
    table = pa.table(
        {
            "image_id": rows.column("image_id"),
            "uri": rows.column("uri"),
            "part": rows.column("part"),
            "item": rows.column("item"),
            "keep": pa.array(_unset(reason)),
            "reason": pa.array(reason.tolist(), pa.string()),
            "group_id": pa.array(
                np.where(named, decisions.image_ids[group], None).tolist(), pa.string()
            ),
            "duplicate_of": pa.array(
                np.where(
                    exact, np.asarray(image_ids, dtype=object), decisions.duplicate_of[at]
                ).tolist(),
                pa.string(),
            ),
            "similarity": pa.array(np.where(exact, 1.0, decisions.similarity[at]), pa.float32()),
        },
        schema=DEDUP,
    )
    return PartResult(
        part=part,
        rows_in=rows.num_rows,
        rows_out=int(np.count_nonzero(_unset(reason))),
        shards={"data": write_shard(table, out_dir / shard_name(part))},
        seconds=time.perf_counter() - started,
    )
