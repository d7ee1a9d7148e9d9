"""A tiny finished job written shard by shard and registered in a real catalog: every row is
chosen here, so the tests can say exactly what each query must answer.

Crawl, ingest part 0: B, A, C, A (repeat: null bytes), D, P (a PNG), L (800x600)
       ingest part 1: C (again), E, F, G, S0 (the bytes of seed image s0)
Dedup: A and C repeats are `exact`; D is a `copy` of B (0.93); E is an eval-set copy.
Cluster (k = 3, centroids e0, e1, e2): 0 = A .05, S0 .10, B .20; 1 = C .01, L .02, P .30;
       2 = G .10, F .40. Seed set `pets`: s0 (= S0) and s1 near e0, s2 near e2.
Retrieve: knn s0 -> A .95, C .80; s1 -> A .90, B .85; s2 -> G .70, F .60; as-is s0, s1, s2.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from curate.catalog import Catalog
from curate.core.atomic import write_json
from curate.core.shards import PartResult, shard_name, write_shard
from curate.settings import Settings
from schemas.job import parse_job_spec
from schemas.shards import DEDUP, EMBED, INGEST, RETRIEVE
from tests.images import encode, jpeg, photo

JOB = "tiny"
EVAL_ID = "f" * 64


@dataclass
class TinyJob:
    settings: Settings
    catalog: Catalog
    ids: dict[str, str]  # name -> image_id
    data: dict[str, bytes]  # name -> bytes
    job_dir: Path

    def id(self, name: str) -> str:
        return self.ids[name]


def _images() -> dict[str, bytes]:
    data = {name: jpeg(64 + i, 48, seed=i) for i, name in enumerate("ABCDEFG")}
    data["P"] = encode(photo(70, 50, seed=20), "PNG")
    data["L"] = jpeg(800, 600, seed=21)
    for i, name in enumerate(("s0", "s1", "s2")):
        data[name] = jpeg(72, 60, seed=30 + i)
    data["S0"] = data["s0"]
    return data


def ingest_rows(names: list[str], part: int, data, ids) -> pa.Table:
    rows, seen = [], set()
    for item, name in enumerate(names):
        repeat = ids[name] in seen
        seen.add(ids[name])
        rows.append(
            {
                "image_id": ids[name],
                "uri": f"/crawl/{name}-{part}-{item}",
                "image": {"bytes": None if repeat else data[name], "path": f"{ids[name]}.x"},
                "width": 64,
                "height": 48,
                "format": "PNG" if name == "P" else "JPEG",
                "mode": "RGB",
                "resized": False,
                "part": part,
                "item": item,
                "metadata": "{}",
            }
        )
    return pa.Table.from_pylist(rows, schema=INGEST)


def _dedup_rows(part: int, rows: list[tuple], ids) -> pa.Table:
    out = []
    for item, (name, keep, reason, group, dup, sim) in enumerate(rows):
        out.append(
            {
                "image_id": ids[name],
                "uri": f"/crawl/{name}-{part}-{item}",
                "part": part,
                "item": item,
                "keep": keep,
                "reason": reason,
                "group_id": ids[group] if group else None,
                "duplicate_of": (ids.get(dup) or dup) if dup else None,
                "similarity": sim,
            }
        )
    return pa.Table.from_pylist(out, schema=DEDUP)


def _unit(v) -> list[float]:
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v)).tolist()


def _register(catalog: Catalog, stage: str, tables: list[tuple[int, pa.Table, Path]]) -> None:
    catalog.start_stage(JOB, stage, len(tables))
    for part, table, path in tables:
        info = write_shard(table, path)
        catalog.commit_part(
            JOB, stage, PartResult(part, table.num_rows, table.num_rows, {"data": info})
        )
    catalog.finish_stage(JOB, stage, "done", 0.1)


def make_tiny_job(root: Path) -> TinyJob:
    settings = Settings(data_root=root / "data", progress=False)
    catalog = Catalog(settings.catalog_file, settings.data_root)
    data = _images()
    ids = {name: hashlib.sha256(b).hexdigest() for name, b in data.items()}
    spec = parse_job_spec({"job_id": JOB, "source": "/crawl", "seeds": ["pets"]})
    catalog.open_job(spec)
    job_dir = settings.job_dir(JOB)

    parts = [["B", "A", "C", "A", "D", "P", "L"], ["C", "E", "F", "G", "S0"]]
    ingest = [
        (p, ingest_rows(names, p, data, ids), job_dir / "ingest" / shard_name(p))
        for p, names in enumerate(parts)
    ]
    _register(catalog, "ingest", ingest)

    dedup = [
        [
            ("B", True, None, "B", None, None),
            ("A", True, None, "A", None, None),
            ("C", True, None, "C", None, None),
            ("A", False, "exact", "A", "A", 1.0),
            ("D", False, "copy", "B", "B", 0.93),
            ("P", True, None, None, None, None),
            ("L", True, None, None, None, None),
        ],
        [
            ("C", False, "exact", "C", "C", 1.0),
            ("E", False, "eval_contamination", None, f"evalx:{EVAL_ID}", 0.5),
            ("F", True, None, None, None, None),
            ("G", True, None, None, None, None),
            ("S0", True, None, None, None, None),
        ],
    ]
    _register(
        catalog,
        "dedup",
        [
            (p, _dedup_rows(p, rows, ids), job_dir / "dedup" / shard_name(p))
            for p, rows in enumerate(dedup)
        ],
    )

    (job_dir / "cluster").mkdir(parents=True)
    np.save(job_dir / "cluster" / "centroids.npy", np.eye(3, 4, dtype=np.float32))
    placed = {"A": (0, 0.05), "S0": (0, 0.10), "B": (0, 0.20), "C": (1, 0.01), "L": (1, 0.02)}
    placed |= {"P": (1, 0.30), "G": (2, 0.10), "F": (2, 0.40)}
    where = {"A": (0, 1), "B": (0, 0), "C": (0, 2), "P": (0, 5), "L": (0, 6)}
    where |= {"F": (1, 2), "G": (1, 3), "S0": (1, 4)}
    cluster = pa.table(
        {
            "image_id": [ids[n] for n in placed],
            "part": pa.array([where[n][0] for n in placed], pa.int32()),
            "item": pa.array([where[n][1] for n in placed], pa.int32()),
            "cluster_id": pa.array([c for c, _ in placed.values()], pa.int32()),
            "distance": pa.array([d for _, d in placed.values()], pa.float32()),
        }
    )
    _register(catalog, "cluster", [(0, cluster, job_dir / "cluster" / shard_name(0))])

    seed_dir = settings.data_root / "seed_sets" / "pets"
    seed_ingest = seed_dir / "ingest-test" / shard_name(0)
    write_shard(ingest_rows(["s0", "s1", "s2"], 0, data, ids), seed_ingest)
    vectors = [_unit([1, 0, 0, 0]), _unit([0.9, 0.1, 0, 0]), _unit([0, 0, 1, 0.2])]
    seed_embed = seed_dir / "embed-test" / shard_name(0)
    write_shard(
        pa.table(
            {
                "image_id": [ids["s0"], ids["s1"], ids["s2"]],
                "part": pa.array([0, 0, 0], pa.int32()),
                "item": pa.array([0, 1, 2], pa.int32()),
                "embedding": pa.array(vectors, pa.list_(pa.float16())),
            },
            schema=EMBED,
        ),
        seed_embed,
    )
    write_json(
        job_dir / "retrieve" / "seed_sets.json",
        {
            "seed_sets": [{"name": "pets", "location": "/seeds", "policy": "as-is+knn:2"}],
            "ingest": {"pets": {"0": str(seed_ingest)}},
            "embed": {"pets": [str(seed_embed)]},
        },
    )
    knn = [("s0", "A", 0, 0.95), ("s0", "C", 1, 0.80), ("s1", "A", 0, 0.90)]
    knn += [("s1", "B", 1, 0.85), ("s2", "G", 0, 0.70), ("s2", "F", 1, 0.60)]

    def retrieve_rows(rows, method):
        return pa.Table.from_pylist(
            [
                {
                    "seed_set": "pets",
                    "seed_id": ids[seed],
                    "image_id": ids[image],
                    "part": where.get(image, (0, 0))[0],
                    "item": where.get(image, (0, 0))[1],
                    "rank": rank,
                    "similarity": sim,
                    "method": method,
                    "cluster_id": placed[image][0] if image in placed else None,
                }
                for seed, image, rank, sim in rows
            ],
            schema=RETRIEVE,
        )

    as_is = [(s, s, r, 1.0) for r, s in enumerate(("s0", "s1", "s2"))]
    _register(
        catalog,
        "retrieve",
        [
            (0, retrieve_rows(knn, "knn"), job_dir / "retrieve" / shard_name(0)),
            (1, retrieve_rows(as_is, "as-is"), job_dir / "retrieve" / shard_name(1)),
        ],
    )
    write_json(job_dir / "stats.json", {"images": 9, "per_method": {"knn": 6, "as-is": 3}})
    catalog.set_job_status(JOB, "done")
    return TinyJob(settings, catalog, ids, data, job_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyJob:
    """One tiny job per test module, for tests that only read it."""
    return make_tiny_job(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def fresh_tiny(tmp_path) -> TinyJob:
    """A tiny job of the test's own, for tests that change it."""
    return make_tiny_job(tmp_path)
