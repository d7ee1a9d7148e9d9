"""Embeddings as unit vectors: normalising rows, and reading EMBED shards into tables of them.

Every vector here is a direction: cosine similarity on L2-normalised embeddings, as in DINOv2.
Inputs are normalised on the way in (a copy; the caller's array is left alone), so float16
embeddings read back from shards, whose norms drift by ~1e-3, need no care from the caller. A row
that cannot be normalised (all zeros, NaN, inf) is a ValueError naming how many rows and which
input: it can only come from a broken embedder, and a silent zero vector would match nothing.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.core.storage import parquet_file

BLOCK = 65_536  # vectors searched or normalised at once: 256 MiB of float32 at 1024-d
EMBED_COLUMNS = ["image_id", "part", "item", "embedding"]


def unit_rows(x: np.ndarray, what: str = "vectors") -> np.ndarray:
    """Rows of `x` as contiguous float32, each scaled to unit L2 norm (a copy).

    Raises ValueError when `x` is not 2-D or a row has no direction (zero, NaN or inf).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [n, d], got shape {x.shape}")
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise ValueError(
            f"{what}: {int(bad.sum())} of {len(out)} rows have no direction (all zeros, NaN or "
            f"inf), first at row {int(np.flatnonzero(bad)[0])}; embeddings must be finite and "
            "non-zero"
        )
    out /= norms[:, None]
    return out


def check_dim(x: np.ndarray, d: int, what: str) -> None:
    """ValueError unless `x` is [n, d]: vectors must match the index or centroids they meet."""
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{what} have dimension {x.shape[1:]} but the index/centroids have {d}")


# -- reading EMBED shards --------------------------------------------------------------------------


@dataclass
class EmbeddingTable:
    """Embeddings with their keys: row i of `vectors` is image `image_ids[i]` at (part, item)."""

    image_ids: pa.Array  # string
    parts: np.ndarray  # int32
    items: np.ndarray  # int32
    vectors: np.ndarray  # float32 [n, d], unit rows

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def slice(self, start: int, stop: int) -> "EmbeddingTable":
        """Rows start..stop (views, no copy)."""
        return EmbeddingTable(
            self.image_ids[start:stop],
            self.parts[start:stop],
            self.items[start:stop],
            self.vectors[start:stop],
        )

    @classmethod
    def concat(cls, tables: Sequence["EmbeddingTable"], dim: int) -> "EmbeddingTable":
        """One table of all rows of `tables` (which all have dimension `dim`)."""
        if not tables:
            return cls(
                pa.array([], pa.string()),
                np.empty(0, np.int32),
                np.empty(0, np.int32),
                np.empty((0, dim), np.float32),
            )
        return cls(
            pa.concat_arrays([t.image_ids for t in tables]),
            np.concatenate([t.parts for t in tables]),
            np.concatenate([t.items for t in tables]),
            np.concatenate([t.vectors for t in tables]),
        )


def _embedding_matrix(column: pa.ChunkedArray | pa.Array, source: str) -> np.ndarray:
    """A list<float16> column as float32 [n, d]; every row must have the same length d."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    blocks = []
    dim = None
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            raise ValueError(f"{source}: {chunk.null_count} rows have a null embedding")
        lengths = pc.list_value_length(chunk)
        lo, hi = pc.min_max(lengths).values()
        if lo.as_py() != hi.as_py() or (dim is not None and lo.as_py() != dim):
            raise ValueError(
                f"{source}: embeddings of different dimensions ({lo.as_py()} to {hi.as_py()}"
                f"{'' if dim is None else f', earlier {dim}'}); one embed model per job"
            )
        dim = lo.as_py()
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        blocks.append(values.reshape(len(chunk), dim))
    if not blocks:
        return np.empty((0, 0), np.float32)
    return unit_rows(np.concatenate(blocks) if len(blocks) > 1 else blocks[0], source)


def _embed_file(path: Path) -> pq.ParquetFile:
    handle = parquet_file(path)
    missing = [c for c in EMBED_COLUMNS if c not in handle.schema_arrow.names]
    if missing:
        raise ValueError(f"{path} is not an embed shard: no column {', '.join(missing)}")
    return handle


def _to_table(batch: pa.RecordBatch | pa.Table, source: str, dim: int | None) -> EmbeddingTable:
    vectors = _embedding_matrix(batch.column("embedding"), source)
    if dim is not None and len(vectors) and vectors.shape[1] != dim:
        raise ValueError(
            f"{source}: embeddings of dimension {vectors.shape[1]}, earlier shards {dim}; "
            "one embed model per job"
        )
    if not len(vectors):
        vectors = np.empty((0, dim or 0), np.float32)
    image_ids = batch.column("image_id")
    if isinstance(image_ids, pa.ChunkedArray):
        image_ids = image_ids.combine_chunks()
    return EmbeddingTable(
        image_ids.cast(pa.string()),
        batch.column("part").to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
        batch.column("item").to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
        vectors,
    )


def iter_embeddings(paths: Sequence[Path], *, batch_rows: int = BLOCK) -> Iterator[EmbeddingTable]:
    """EMBED shards as tables of at most `batch_rows` rows, in order: memory is one batch."""
    dim = None
    for path in paths:
        handle = _embed_file(Path(path))
        for batch in handle.iter_batches(batch_size=batch_rows, columns=EMBED_COLUMNS):
            table = _to_table(batch, str(path), dim)
            if len(table):
                dim = table.dim
                yield table


def read_embeddings(
    paths: Sequence[Path], *, sample: int | None = None, seed: int = 0
) -> EmbeddingTable:
    """The rows of EMBED shards, vectors as unit float32.

    sample=n: a uniform sample of min(n, N) rows without replacement, the same for the same
    (paths, n, seed); only the row groups holding sampled rows are read, so memory is the
    sample plus one row group whatever N is.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no embed shards to read")
    if sample is None:
        tables = list(iter_embeddings(paths))
        return EmbeddingTable.concat(tables, tables[0].dim if tables else 0)
    if sample < 0:
        raise ValueError(f"sample must be >= 0, got {sample}")
    handles = [_embed_file(p) for p in paths]
    counts = [[h.metadata.row_group(i).num_rows for i in range(h.num_row_groups)] for h in handles]
    total = sum(sum(c) for c in counts)
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(sample, total), replace=False))
    tables, dim, start = [], None, 0
    for path, handle, groups in zip(paths, handles, counts, strict=True):
        for group, rows in enumerate(groups):
            lo, hi = np.searchsorted(chosen, [start, start + rows])
            if hi > lo:
                data = handle.read_row_group(group, columns=EMBED_COLUMNS)
                picked = data.take(pa.array(chosen[lo:hi] - start))
                table = _to_table(picked, str(path), dim)
                dim = table.dim
                tables.append(table)
            start += rows
    return EmbeddingTable.concat(tables, dim or 0)
