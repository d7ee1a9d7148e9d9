"""Dedup, first pass: per distinct image of one ingest shard, its hash features and copy
descriptor. Runs shard by shard on the workers; the decisions need all shards (decide.py)."""

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.core.shards import PartResult, ShardRef, shard_name, write_shard
from curate.core.storage import read_table
from curate.stages.dedup.copy_detection import (
    FIXED_SIZE,
    copy_descriptors,
    copy_transform,
    load_copy_descriptor,
)
from curate.stages.dedup.pca_hash.features import hash_features_batch, phash_codes
from curate.stages.ingest.decode import load_rgb
from schemas.job import DedupOptions
from schemas.shards import DEDUP_FEATURES

# Images decoded at once: bounds a worker's memory to a batch of decoded pixels, not a shard.
_DECODE_BATCH = 64


@dataclass(frozen=True)
class CopyModelSpec:
    """What a worker needs to load the copy-descriptor model itself."""

    weights: Path | None
    arch: str
    allow_random: bool
    input_size: int = FIXED_SIZE  # the square side the model sees (its card's, SSCD's 320)

    @property
    def enabled(self) -> bool:
        return self.weights is not None or self.allow_random

    def fingerprint(self) -> str:
        """Names the model for caches: descriptors of different models never mix."""
        if self.weights is None:
            return f"random-{self.arch}"
        stat = Path(self.weights).stat()
        return f"{Path(self.weights).name}-{stat.st_size}-{int(stat.st_mtime)}"


def _decoded_batches(rows: list[dict]) -> Iterator[list[Image.Image]]:
    for start in range(0, len(rows), _DECODE_BATCH):
        yield [load_rgb(row["image"]["bytes"]) for row in rows[start : start + _DECODE_BATCH]]


def list_column(blocks: list[np.ndarray], dtype: pa.DataType, rows: int) -> pa.Array:
    """Stacked row vectors as an Arrow list column; all nulls when there are none."""
    if not blocks:
        return pa.nulls(rows, pa.list_(dtype))
    matrix = np.concatenate(blocks)
    offsets = np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.ravel(), type=dtype))


def list_matrix(column: pa.ChunkedArray, dtype: type) -> np.ndarray | None:
    """The inverse of list_column: an [N, D] matrix, or None when the column is all null."""
    if column.null_count == len(column):
        return None
    flat = column.combine_chunks()
    return np.asarray(flat.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(
        len(flat), -1
    )


def _hash_features(images: list[Image.Image], options: DedupOptions) -> np.ndarray:
    if options.hash == "phash":
        # PHash's 64 bits as 0/1 features: the decisions pack them back, no PCA.
        return np.unpackbits(phash_codes(images), axis=1).astype(np.float32)
    return hash_features_batch(images)


def dedup_features_part(
    shard: ShardRef, options: DedupOptions, copy_model: CopyModelSpec, out_dir: Path
) -> PartResult:
    """Hash features and copy descriptors of the images stored in one ingest shard."""
    started = time.perf_counter()
    columns = ["image_id", "part", "item", "image", "width", "height"]
    table = read_table(shard.path, columns)
    # Repeats within the shard are stored without bytes: their image is already here.
    rows = [row for row in table.to_pylist() if row["image"]["bytes"] is not None]
    model = (
        load_copy_descriptor(
            copy_model.weights, allow_random=copy_model.allow_random, trunk=copy_model.arch
        )
        if copy_model.enabled
        else None  # the driver has said why, once
    )
    transform = copy_transform(copy_model.input_size)
    features: list[np.ndarray] = []
    descriptors: list[np.ndarray] = []
    for images in _decoded_batches(rows):
        features.append(_hash_features(images, options))
        if model is not None:
            descriptors.append(
                copy_descriptors(
                    model, images, batch_size=options.copy_batch_size, transform=transform
                )
            )
    out = pa.table(
        {
            "image_id": [row["image_id"] for row in rows],
            "part": [row["part"] for row in rows],
            "item": [row["item"] for row in rows],
            "area": [row["width"] * row["height"] for row in rows],
            "hash_features": list_column(features, pa.float32(), len(rows)),
            "copy_descriptor": list_column(descriptors, pa.float16(), len(rows)),
        },
        schema=DEDUP_FEATURES,
    )
    return PartResult(
        part=shard.index,
        rows_in=table.num_rows,
        rows_out=out.num_rows,
        shards={"data": write_shard(out, out_dir / shard_name(shard.index))},
        seconds=time.perf_counter() - started,
    )
