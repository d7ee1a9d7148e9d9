"""Dedup, second pass: from every image's hash features and copy descriptor, decide which
images stay. Exact repeats, then PCA-hash near duplicates, then copies, then copies of
evaluation images; each removed image names what it duplicates."""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.dedup.features import list_matrix
from curate.dedup.grouping import connected_components, representatives
from curate.dedup.knn_graph import contamination, copy_edges
from curate.dedup.pca_hash import HAMMING_RADIUS, PHASH_RADIUS, PCAHasher, near_duplicate_pairs
from curate.shards import PartResult, ShardRef, shard_name, write_shard
from schemas.job import DedupOptions
from schemas.shards import DEDUP

STAGE = "dedup"
PCA_BASIS = "pca_hash.npz"


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


def _distinct_images(feature_shards: list[Path]) -> pa.Table:
    table = pa.concat_tables([pq.read_table(path) for path in feature_shards])
    table = table.sort_by([("part", "ascending"), ("item", "ascending")])
    # An image stored in several ingest shards has a feature row in each: keep the first.
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)
    return table.take(pa.array(np.sort(first)))


def _occurrences(ingest_shards: list[Path], image_ids: np.ndarray) -> np.ndarray:
    counts: dict[str, int] = {}
    for path in ingest_shards:
        for image_id in pq.read_table(path, columns=["image_id"]).column(0).to_pylist():
            counts[image_id] = counts.get(image_id, 0) + 1
    return np.array([counts[i] for i in image_ids], dtype=np.int64)


def _hash_codes(features: np.ndarray, options: DedupOptions, out_dir: Path) -> np.ndarray:
    if options.hash == "phash":
        return np.packbits(features > 0.5, axis=1)
    bits = options.hash_bits
    if len(features) > 2 * bits:
        hasher = PCAHasher.fit(
            features,
            bits=bits,
            itq_iterations=options.itq_iterations,
            seed=0,
            sample_size=options.pca_sample,
        )
    else:
        hasher = PCAHasher.dct_signs(features.shape[1], bits)
    out_dir.mkdir(parents=True, exist_ok=True)
    hasher.save(out_dir / PCA_BASIS)
    return hasher.codes(features)


def _radius(options: DedupOptions) -> int:
    if options.hamming_radius is not None:
        return options.hamming_radius
    return PHASH_RADIUS if options.hash == "phash" else HAMMING_RADIUS


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
) -> Decisions:
    """Every dedup decision of a job, from all of its feature shards at once."""
    images = _distinct_images(feature_shards)
    n = images.num_rows
    ids = np.asarray(images.column("image_id").to_pylist(), dtype=object)
    area = images.column("area").to_numpy()
    order = np.arange(n)
    reason = np.full(n, None, dtype=object)
    duplicate_of = np.full(n, None, dtype=object)
    similarity = np.ones(n, dtype=np.float32)
    group = order.copy()
    metrics: dict = {"images": n}

    if n:
        # Pass 1: near duplicates, by Hamming distance between hash codes.
        features = list_matrix(images.column("hash_features"), np.float32)
        codes = _hash_codes(features, options, out_dir)
        left, right, _ = near_duplicate_pairs(codes, _radius(options))
        group = representatives(connected_components(n, left, right), area, order)
        hashed = group != order
        reason[hashed] = "pca_hash"
        distance = _hamming(codes, order[hashed], group[hashed])
        similarity[hashed] = 1 - distance / (codes.shape[1] * 8)
        metrics["hash_pairs"] = int(len(left))

    descriptors = list_matrix(images.column("copy_descriptor"), np.float16) if n else None
    if descriptors is None:
        metrics["copy_detection"] = "skipped: no copy-descriptor weights"
    else:
        # Pass 2: copies among what the hash kept, by cosine between copy descriptors.
        survivors = np.flatnonzero(_unset(reason))
        left, right, _ = copy_edges(
            descriptors[survivors], k=options.copy_k, threshold=options.copy_threshold
        )
        local = representatives(
            connected_components(len(survivors), left, right), area[survivors], survivors
        )
        group[survivors] = survivors[local]
        group = group[group]  # hash duplicates follow their representative into its new group
        copied = survivors[survivors[local] != survivors]
        reason[copied] = "copy"
        similarity[copied] = np.einsum(
            "ij,ij->i",
            descriptors[copied].astype(np.float32),
            descriptors[group[copied]].astype(np.float32),
        )
        metrics["copy_edges"] = int(len(left))

        # Pass 3: what is still kept and sits in one component with an evaluation image.
        for eval_set in eval_sets:
            kept = np.flatnonzero(_unset(reason))
            crawl, evaluation, sims = contamination(
                descriptors[kept],
                eval_set.descriptors,
                threshold=options.eval_threshold,
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
        first_part=images.column("part").to_numpy(),
        first_item=images.column("item").to_numpy(),
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
    rows = pq.read_table(shard.path, columns=["image_id", "uri", "part", "item"])
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
