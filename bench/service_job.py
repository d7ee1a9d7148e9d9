"""A synthetic finished job of 100,000 images for the service benchmark, written directly as the
shards the stages would register, with real image bytes.

What is synthetic: the embeddings (64-d, drawn around ~316 random centres, as many as k-means
would make for 100k images), the cluster assignment (each image's nearest centre), dedup (2% of
the images removed as copies of their neighbour) and retrieval (1,000 seed images with knn:8,
as-is and cluster:25, computed exactly from the synthetic embeddings). What is real: every
image's bytes are a JPEG photo (512x384, ~33 KB), so thumbnails decode and scale real data. Only
BASE_PHOTOS distinct pictures are generated (generating 100k costs half an hour here); each image
is one of them with a JPEG comment segment naming its index inserted after the start marker, so
every image has its own bytes and its own id (the SHA-256 of the bytes), as in a real crawl.
"""

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.catalog import Catalog
from curate.core.atomic import write_json
from curate.core.shards import PartResult, ShardWriter, shard_name, write_shard
from curate.settings import Settings
from schemas.job import parse_job_spec
from schemas.shards import CLUSTER, DEDUP, EMBED, INGEST, RETRIEVE

JOB = "bench"
SEED_SET = "bench-seeds"
VERSION = 1  # bump when the job's layout changes: a cached job of another version is rebuilt
BASE_PHOTOS = 1000
DIM = 64
CHUNK = 1024  # rows per write: one shard row group


def photo(seed: int, width: int = 512, height: int = 384) -> bytes:
    """A photo-like JPEG: smooth colour regions plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 32, width // 32, 3)).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(smooth).astype(np.int16) + rng.normal(0, 5, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
    return out.getvalue()


def tagged(base: bytes, tag: str) -> bytes:
    """`base` with a JPEG comment (COM) segment after SOI: the same picture, other bytes."""
    payload = tag.encode()
    return base[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + base[2:]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _register(catalog: Catalog, stage: str, shards: list[tuple[int, object]]) -> None:
    catalog.start_stage(JOB, stage, len(shards))
    for part, info in shards:
        result = PartResult(part, info.rows, info.rows, {"data": info}, seconds=0.0)
        catalog.commit_part(JOB, stage, result)
    catalog.finish_stage(JOB, stage, "done", 0.0)


def _ingest_shard(path: Path, part: int, ids: list[str], blobs: list[bytes], prefix: str):
    with ShardWriter(path, INGEST) as writer:
        for start in range(0, len(ids), CHUNK):
            rows = [
                {
                    "image_id": ids[i],
                    "uri": f"{prefix}/{part:03d}/{i:06d}.jpg",
                    "image": {"bytes": blobs[i], "path": f"{ids[i]}.jpg"},
                    "width": 512,
                    "height": 384,
                    "format": "JPEG",
                    "mode": "RGB",
                    "resized": False,
                    "part": part,
                    "item": i,
                    "metadata": "{}",
                }
                for i in range(start, min(start + CHUNK, len(ids)))
            ]
            writer.write(pa.Table.from_pylist(rows, schema=INGEST))
    return writer.info


def build_job(data_root: Path, images: int = 100_000, parts: int = 10, seeds: int = 1000) -> dict:
    """Write and register the job under `data_root` (kept if already there); its facts."""
    facts_path = data_root / "bench-job.json"
    if facts_path.exists():
        facts = json.loads(facts_path.read_text())
        if facts.get("version") == VERSION and facts.get("images") == images:
            return facts
    # Anything else there (another size, a build killed half way) goes: the catalog of a job
    # is written once.
    shutil.rmtree(data_root, ignore_errors=True)
    settings = Settings(data_root=data_root, progress=False)
    catalog = Catalog(settings.catalog_file, data_root)
    catalog.open_job(parse_job_spec({"job_id": JOB, "source": "/bench/crawl", "seeds": [SEED_SET]}))
    job_dir = settings.job_dir(JOB)
    rng = np.random.default_rng(0)
    bases = [photo(seed) for seed in range(BASE_PHOTOS)]
    k = int(round(np.sqrt(images)))
    centres = _unit(rng.normal(size=(k, DIM)))
    truth = rng.integers(0, k, images)
    vectors = _unit(centres[truth] + rng.normal(0, 0.35, (images, DIM)))
    per_part = -(-images // parts)

    # Ingest: real bytes, part by part (memory: one part of ~330 MB at a time).
    ids: list[str] = []
    ingest = []
    for part in range(parts):
        index = range(part * per_part, min((part + 1) * per_part, images))
        blobs = [tagged(bases[i % BASE_PHOTOS], f"crawl {i}") for i in index]
        part_ids = [hashlib.sha256(b).hexdigest() for b in blobs]
        ids += part_ids
        path = job_dir / "ingest" / shard_name(part)
        ingest.append((part, _ingest_shard(path, part, part_ids, blobs, "/bench/crawl")))
    _register(catalog, "ingest", ingest)
    where = np.arange(images)
    part_of, item_of = where // per_part, where % per_part

    # Dedup: every 50th image is a copy of the one before it.
    removed = where % 50 == 49
    representative = np.zeros(images, bool)
    representative[:-1] = removed[1:]
    dedup = []
    for part in range(parts):
        rows = np.flatnonzero(part_of == part)
        table = pa.table(
            {
                "image_id": [ids[i] for i in rows],
                "uri": [f"/bench/crawl/{part:03d}/{item_of[i]:06d}.jpg" for i in rows],
                "part": pa.array(part_of[rows], pa.int32()),
                "item": pa.array(item_of[rows], pa.int32()),
                "keep": pa.array(~removed[rows]),
                "reason": pa.array(["copy" if removed[i] else None for i in rows], pa.string()),
                "group_id": [
                    ids[i - 1] if removed[i] else ids[i] if representative[i] else None
                    for i in rows
                ],
                "duplicate_of": [ids[i - 1] if removed[i] else None for i in rows],
                "similarity": pa.array([0.9 if removed[i] else None for i in rows], pa.float32()),
            },
            schema=DEDUP,
        )
        dedup.append((part, write_shard(table, job_dir / "dedup" / shard_name(part))))
    _register(catalog, "dedup", dedup)

    # Embed and cluster: the kept images, each assigned to its nearest centre.
    kept = np.flatnonzero(~removed)
    cluster_ids = np.argmax(vectors[kept] @ centres.T, axis=1)
    distances = 1.0 - np.einsum("ij,ij->i", vectors[kept], centres[cluster_ids])
    embed, cluster = [], []
    for part in range(parts):
        at = np.flatnonzero(part_of[kept] == part)
        rows = kept[at]
        common = {
            "image_id": [ids[i] for i in rows],
            "part": pa.array(part_of[rows], pa.int32()),
            "item": pa.array(item_of[rows], pa.int32()),
        }
        embedded = pa.table(
            {
                **common,
                "embedding": pa.array(
                    list(vectors[rows].astype(np.float16)), pa.list_(pa.float16())
                ),
            },
            schema=EMBED,
        )
        embed.append((part, write_shard(embedded, job_dir / "embed" / shard_name(part))))
        clustered = pa.table(
            {
                **common,
                "cluster_id": pa.array(cluster_ids[at], pa.int32()),
                "distance": pa.array(distances[at], pa.float32()),
            },
            schema=CLUSTER,
        )
        cluster.append((part, write_shard(clustered, job_dir / "cluster" / shard_name(part))))
    _register(catalog, "embed", embed)
    (job_dir / "cluster").mkdir(parents=True, exist_ok=True)
    np.save(job_dir / "cluster" / "centroids.npy", centres)
    _register(catalog, "cluster", cluster)

    # The seed set: 1,000 seed images around 100 of the centres, ingested and embedded.
    seed_dir = data_root / "seed_sets" / SEED_SET
    seed_truth = rng.choice(k, 100, replace=False)[rng.integers(0, 100, seeds)]
    seed_vectors = _unit(centres[seed_truth] + rng.normal(0, 0.35, (seeds, DIM)))
    seed_blobs = [tagged(bases[(7 * i) % BASE_PHOTOS], f"seed {i}") for i in range(seeds)]
    seed_ids = [hashlib.sha256(b).hexdigest() for b in seed_blobs]
    seed_ingest = _ingest_shard(
        seed_dir / "ingest" / shard_name(0), 0, seed_ids, seed_blobs, "/bench/seeds"
    )
    seed_embed = write_shard(
        pa.table(
            {
                "image_id": seed_ids,
                "part": pa.array(np.zeros(seeds), pa.int32()),
                "item": pa.array(np.arange(seeds), pa.int32()),
                "embedding": pa.array(
                    list(seed_vectors.astype(np.float16)), pa.list_(pa.float16())
                ),
            },
            schema=EMBED,
        ),
        seed_dir / "embed" / shard_name(0),
    )
    catalog.add_seed_set(SEED_SET, "/bench/seeds", "as-is+knn:8+cluster:25", None)
    write_json(
        job_dir / "retrieve" / "seed_sets.json",
        {
            "seed_sets": [
                {
                    "name": SEED_SET,
                    "location": "/bench/seeds",
                    "policy": "as-is+knn:8+cluster:25",
                    "cap": None,
                    "images": seeds,
                }
            ],
            "ingest": {SEED_SET: {"0": str(seed_ingest.path)}},
            "embed": {SEED_SET: [str(seed_embed.path)]},
        },
    )
    retrieve = _retrieve(
        rng, ids, kept, vectors, cluster_ids, seed_ids, seed_vectors, centres, part_of, item_of
    )
    shards = [
        (p, write_shard(t, job_dir / "retrieve" / shard_name(p))) for p, t in enumerate(retrieve)
    ]
    _register(catalog, "retrieve", shards)
    write_json(
        job_dir / "stats.json",
        {"images": int(sum(t.num_rows for t in retrieve)), "synthetic": True},
    )
    catalog.set_job_status(JOB, "done")
    facts = {
        "version": VERSION,
        "images": images,
        "kept": int(len(kept)),
        "clusters": k,
        "seeds": seeds,
        "seed_ids": seed_ids,
        "image_ids": ids,
    }
    write_json(facts_path, facts)
    return facts


def _retrieve(
    rng, ids, kept, vectors, cluster_ids, seed_ids, seed_vectors, centres, part_of, item_of
):
    """RETRIEVE tables: knn:8 (exact, over the kept images), as-is, cluster:25."""

    def table(rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=RETRIEVE)

    knn = []
    crawl = vectors[kept]
    for start in range(0, len(seed_ids), 100):
        sims = seed_vectors[start : start + 100] @ crawl.T
        top = np.argsort(-sims, axis=1)[:, :8]
        for s, row in enumerate(top):
            for rank, j in enumerate(row):
                i = kept[j]
                knn.append(
                    {
                        "seed_set": SEED_SET,
                        "seed_id": seed_ids[start + s],
                        "image_id": ids[i],
                        "part": int(part_of[i]),
                        "item": int(item_of[i]),
                        "rank": rank,
                        "similarity": float(sims[s, j]),
                        "method": "knn",
                        "cluster_id": int(cluster_ids[j]),
                    }
                )
    as_is = [
        {
            "seed_set": SEED_SET,
            "seed_id": sid,
            "image_id": sid,
            "part": 0,
            "item": i,
            "rank": i,
            "similarity": 1.0,
            "method": "as-is",
            "cluster_id": None,
        }
        for i, sid in enumerate(seed_ids)
    ]
    seed_clusters = np.argmax(seed_vectors @ centres.T, axis=1)
    counts = np.bincount(seed_clusters, minlength=len(centres))
    picked = []
    for c in np.flatnonzero(counts >= 3):
        members = np.flatnonzero(cluster_ids == c)
        for rank, j in enumerate(rng.choice(members, min(25, len(members)), replace=False)):
            i = kept[j]
            picked.append(
                {
                    "seed_set": SEED_SET,
                    "seed_id": None,
                    "image_id": ids[i],
                    "part": int(part_of[i]),
                    "item": int(item_of[i]),
                    "rank": rank,
                    "similarity": None,
                    "method": "cluster",
                    "cluster_id": int(c),
                }
            )
    return [table(as_is), table(knn), table(picked)]
