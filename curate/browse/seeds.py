"""The seed sets a job retrieved for, as browsing needs them: where their images' bytes are (the
ingest shards pinned with the job) and which of the job's clusters each seed image falls in (its
embedding assigned to the job's centroids)."""

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from curate.core import storage
from curate.core.vectors import iter_embeddings
from curate.stages.cluster.kmeans import assign
from curate.stages.retrieve.pinning import PINNED_SEED_SETS

SEED_PLACES = pa.schema(
    [
        ("seed_set", pa.string()),
        ("image_id", pa.string()),
        ("cluster_id", pa.int32()),
        ("distance", pa.float32()),
    ]
)


def pinned(job_dir: Path, retrieve_dir: str = "retrieve") -> dict[str, Any] | None:
    """The job's pinned seed sets (curate/stages/retrieve/pinning.py), or None before retrieval."""
    path = job_dir / retrieve_dir / PINNED_SEED_SETS
    return storage.read_json(path) if storage.exists(path) else None


def seed_ingest_shards(pin: dict[str, Any] | None, data_root: Path) -> dict[str, list[Path]]:
    """seed set -> its ingest shards, in part order."""
    if not pin:
        return {}
    return {
        name: [
            storage.resolve(path, data_root)
            for _, path in sorted(shards.items(), key=lambda kv: int(kv[0]))
        ]
        for name, shards in pin.get("ingest", {}).items()
    }


def seed_embed_shards(
    pin: dict[str, Any] | None, data_root: Path, arch: str, image_size: int
) -> dict[str, list[Path]]:
    """seed set -> the EMBED shards its retrieval used.

    Jobs pin them since the service exists; for a job pinned before, the set's embedding cache
    made with the job's architecture and input size is used (the newest, if the weights file
    changed between jobs: the fingerprint names the weights' hash, which only the driver knows).
    """
    if not pin:
        return {}
    if "embed" in pin:
        return {
            name: [storage.resolve(p, data_root) for p in paths]
            for name, paths in pin["embed"].items()
        }
    found: dict[str, list[Path]] = {}
    for entry in pin.get("seed_sets", []):
        name = entry["name"]
        prefix = f"{arch}@{image_size}:"
        candidates = []
        for complete in storage.listing(data_root / "seed_sets" / name, "embed-*/complete.json"):
            manifest = storage.read_json(complete)
            if str(manifest.get("model", "")).startswith(prefix):
                modified = storage.version(complete)[1]  # listed: it is stored
                candidates.append((modified, manifest["shards"]))
        if candidates:
            found[name] = [storage.resolve(p, data_root) for p in max(candidates)[1]]
    return found


def place_seeds(embed: dict[str, list[Path]], centroids: np.ndarray) -> pa.Table:
    """Every seed image's nearest centroid: (seed_set, image_id, cluster_id, distance), where
    distance = 1 - cosine, as the cluster stage measures crawl images."""
    tables = [SEED_PLACES.empty_table()]
    for name, paths in sorted(embed.items()):
        existing = [p for p in paths if storage.exists(p)]
        for block in iter_embeddings(existing):
            if not len(block):
                continue
            cluster_ids, distances = assign(block.vectors, centroids)
            tables.append(
                pa.table(
                    {
                        "seed_set": pa.array([name] * len(block), pa.string()),
                        "image_id": block.image_ids,
                        "cluster_id": pa.array(cluster_ids, pa.int32()),
                        "distance": pa.array(distances, pa.float32()),
                    },
                    schema=SEED_PLACES,
                )
            )
    return pa.concat_tables(tables)
