"""The curated stage: best match per image, sampling, shuffled shards, Hugging Face loading,
the dataset card, and exactly-once commits on Ray through a SIGKILL of the driver."""

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.catalog import Catalog
from curate.core.shards import PartResult, ShardInfo, file_sha256, write_shard
from curate.core.stage import JobRun
from curate.settings import Settings
from curate.stages.curated.card import dataset_stats, write_dataset_card
from curate.stages.curated.layout import scatter_path
from curate.stages.curated.select import SelectionError, select
from curate.stages.curated.shuffle import gather_bucket, scatter_source
from curate.stages.curated.stage import STAGE as CURATED_STAGE
from curate.stages.retrieve.pinning import pin_seed_sets
from pipelines.executor import RayCompute, run_stage
from schemas.job import parse_job_spec
from schemas.shards import INGEST, RETRIEVE
from tests.images import encode, jpeg, photo
from tests.kill import KILL_HOOK, run_script_killed

JOB = "cur"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ingest_shard(path: Path, part: int, items: list[tuple[str, bytes, bool]]) -> list[dict]:
    """Write an INGEST shard of (uri, bytes, is_repeat) items; repeats are stored without bytes."""
    rows = []
    for item, (uri, data, repeat) in enumerate(items):
        fmt = "PNG" if data.startswith(b"\x89PNG") else "JPEG"
        image_id = sha(data)
        rows.append(
            {
                "image_id": image_id,
                "uri": uri,
                "image": {"bytes": None if repeat else data, "path": f"{image_id}.{fmt.lower()}"},
                "width": 100 + item,
                "height": 80 + part,
                "format": fmt,
                "mode": "RGB",
                "resized": False,
                "part": part,
                "item": item,
                "metadata": "{}",
            }
        )
    write_shard(pa.Table.from_pylist(rows, schema=INGEST), path)
    return rows


def retrieve_shard(path: Path, rows: list[tuple]) -> None:
    """RETRIEVE rows from (seed_set, seed_id, image_id, part, item, rank, sim, method, cluster)."""
    write_shard(
        pa.Table.from_pylist([dict(zip(RETRIEVE.names, r, strict=True)) for r in rows], RETRIEVE),
        path,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Two crawl ingest shards, a seed set's ingest shard, and two retrieve shards with
    collisions, ties, an as-is image that is also in the crawl, and a pointer at a repeat row."""
    root = tmp_path_factory.mktemp("assemble")
    crawl = [jpeg(120, 90, seed=100 + i) for i in range(4)]
    crawl += [encode(photo(96, 96, seed=104 + i), "PNG") for i in range(2)]
    crawl += [jpeg(110, 100, seed=106 + i) for i in range(5)]
    seeds = [jpeg(140, 100, seed=200 + i) for i in range(3)]
    c = [sha(b) for b in crawl]
    s = [sha(b) for b in seeds]
    part0 = [(f"http://crawl/{i}", crawl[i], False) for i in range(6)]
    part0.append(("http://crawl/1-again", crawl[1], True))  # item 6: exact repeat of c1
    part1 = [(f"http://crawl/{i}", crawl[i], False) for i in range(6, 11)]
    part1.append(("http://crawl/seed0-copy", seeds[0], False))  # item 5: s0 is in the crawl too
    ingest = {
        0: root / "crawl" / "part-000000.parquet",
        1: root / "crawl" / "part-000001.parquet",
    }
    seed_ingest = {0: root / "beta" / "part-000000.parquet"}
    ingest_shard(ingest[0], 0, part0)
    ingest_shard(ingest[1], 1, part1)
    ingest_shard(seed_ingest[0], 0, [(f"file://beta/{i}.jpg", seeds[i], False) for i in range(3)])
    alpha = [
        ("alpha", "a0", c[0], 0, 0, 0, 0.9, "knn", None),
        ("alpha", "a0", c[1], 0, 6, 1, 0.8, "knn", None),  # the repeat row: bytes are at item 1
        ("alpha", "a1", c[1], 0, 1, 0, 0.85, "knn", None),
        ("alpha", "a1", c[2], 0, 2, 1, 0.5, "knn", None),
        ("alpha", "a0", s[0], 1, 5, 2, 1.0, "knn", None),
        ("alpha", "a1", c[6], 1, 0, 2, 0.7, "knn", None),
        ("alpha", "a1", c[7], 1, 1, 3, 0.6, "knn", None),
    ]
    beta = [("beta", s[i], s[i], 0, i, i, 1.0, "as-is", None) for i in range(3)]
    beta += [
        ("beta", None, c[0], 0, 0, 0, 0.7, "cluster", 3),
        ("beta", None, c[3], 0, 3, 1, 0.65, "cluster", 3),
        ("beta", None, c[4], 0, 4, 2, 0.6, "cluster", 3),
        ("beta", None, c[5], 0, 5, 3, 0.55, "cluster", 5),
        ("beta", None, c[8], 1, 3, 4, 0.5, "cluster", 5),
        ("beta", s[1], c[2], 0, 2, 0, 0.5, "knn", None),  # ties alpha's 0.5: alpha sorts first
        ("beta", s[2], c[9], 1, 4, 0, 0.75, "knn", None),
    ]
    retrieve = [
        root / "retrieve" / "part-000000.parquet",
        root / "retrieve" / "part-000001.parquet",
    ]
    retrieve_shard(retrieve[0], alpha)
    retrieve_shard(retrieve[1], beta)
    # image_id -> (seed_set, seed_id, method, similarity, cluster_id, matches, uri, bytes)
    expected = {
        c[0]: ("alpha", "a0", "knn", 0.9, None, 2, "http://crawl/0", crawl[0]),
        c[1]: ("alpha", "a1", "knn", 0.85, None, 2, "http://crawl/1", crawl[1]),
        c[2]: ("alpha", "a1", "knn", 0.5, None, 2, "http://crawl/2", crawl[2]),
        c[3]: ("beta", None, "cluster", 0.65, 3, 1, "http://crawl/3", crawl[3]),
        c[4]: ("beta", None, "cluster", 0.6, 3, 1, "http://crawl/4", crawl[4]),
        c[5]: ("beta", None, "cluster", 0.55, 5, 1, "http://crawl/5", crawl[5]),
        c[6]: ("alpha", "a1", "knn", 0.7, None, 1, "http://crawl/6", crawl[6]),
        c[7]: ("alpha", "a1", "knn", 0.6, None, 1, "http://crawl/7", crawl[7]),
        c[8]: ("beta", None, "cluster", 0.5, 5, 1, "http://crawl/8", crawl[8]),
        c[9]: ("beta", s[2], "knn", 0.75, None, 1, "http://crawl/9", crawl[9]),
        # as-is beats alpha's equally similar knn match, and its bytes come from the seed set.
        s[0]: ("beta", s[0], "as-is", 1.0, None, 2, "file://beta/0.jpg", seeds[0]),
        s[1]: ("beta", s[1], "as-is", 1.0, None, 1, "file://beta/1.jpg", seeds[1]),
        s[2]: ("beta", s[2], "as-is", 1.0, None, 1, "file://beta/2.jpg", seeds[2]),
    }
    return {
        "root": root,
        "ingest": ingest,
        "seed_ingest": {"beta": seed_ingest},
        "retrieve": retrieve,
        "expected": expected,
        "source_order": [c[i] for i in range(10)] + s,
    }


def path_of(corpus: dict) -> Callable[[str, str, int], Path]:
    def ingest_path_of(method: str, seed_set: str, part: int) -> Path:
        return (
            corpus["seed_ingest"][seed_set][part] if method == "as-is" else corpus["ingest"][part]
        )

    return ingest_path_of


def assemble_locally(corpus: dict, work: Path, out: Path, **options) -> list[Path]:
    """select, scatter and gather in this process, as the Ray stage does; the curated shards."""
    selection = select(corpus["retrieve"], work, **options)
    for source in selection.sources:
        path = path_of(corpus)(source.method, source.seed_set, source.part)
        result = scatter_source(replace(source, ingest=path), work)
        assert result.rows_out == source.rows
    shards = []
    for bucket in selection.buckets:
        result = gather_bucket(bucket, work, out)
        assert (
            result.rows_out == bucket.rows == pq.read_metadata(result.shards["data"].path).num_rows
        )
        shards.append(result.shards["data"].path)
    return shards


def curated_rows(shards: list[Path]) -> list[dict]:
    return [row for path in shards for row in pq.read_table(path).to_pylist()]


@pytest.mark.parametrize("batch_rows", [64, 1])
def test_every_selected_image_once_with_its_best_match_and_bytes(
    corpus, tmp_path, monkeypatch, batch_rows
):
    # batch_rows 1: every bucket spans many record batches and every take many slices, the
    # layout a bucket with more than 2 GiB of image bytes gets.
    monkeypatch.setattr("curate.stages.curated.shuffle._BATCH_ROWS", batch_rows)
    shards = assemble_locally(
        corpus, tmp_path / "work", tmp_path / "out", target_size=None, rows_per_shard=4
    )
    rows = curated_rows(shards)
    expected = corpus["expected"]
    assert sorted(r["image_id"] for r in rows) == sorted(expected)
    for row in rows:
        seed_set, seed_id, method, similarity, cluster_id, matches, uri, data = expected[
            row["image_id"]
        ]
        assert (row["seed_set"], row["seed_id"], row["method"]) == (seed_set, seed_id, method)
        assert row["similarity"] == pytest.approx(similarity)
        assert (row["cluster_id"], row["matches"], row["uri"]) == (cluster_id, matches, uri)
        assert row["image"]["bytes"] == data
        assert sha(row["image"]["bytes"]) == row["image_id"]
    # 13 images at 4 per shard: about 4 hashed buckets, never an empty one.
    assert len(shards) >= 2 and all(pq.read_metadata(p).num_rows > 0 for p in shards)

    counts = select(corpus["retrieve"], tmp_path / "work", target_size=None, rows_per_shard=4)
    counts = counts.counts
    assert counts["retrieve_rows"] == 17 and counts["images"] == counts["selected"] == 13
    assert counts["collisions"] == {"collided_images": 4, "extra_rows": 4, "cross_set_images": 3}
    assert counts["per_seed_set"]["alpha"] == {"retrieved": 5, "selected": 5}
    assert counts["per_method"]["as-is"] == {"retrieved": 3, "selected": 3}
    assert counts["sources"] == 3  # crawl parts 0 and 1, and the seed set's part 0


def test_order_is_shuffled_and_deterministic_for_a_seed(corpus, tmp_path):
    def order(name: str, seed: int) -> list[str]:
        shards = assemble_locally(
            corpus,
            tmp_path / name / "work",
            tmp_path / name / "out",
            target_size=None,
            rows_per_shard=100,
            seed=seed,
        )
        assert len(shards) == 1
        return [r["image_id"] for r in curated_rows(shards)]

    first, again, other = order("a", 0), order("b", 0), order("c", 1)
    assert first == again, "the same seed gives the same order"
    assert first != other, "another seed gives another order"
    assert first != corpus["source_order"] and first != sorted(first)


def test_target_size_is_an_exact_deterministic_sample(corpus, tmp_path):
    def sample(name: str, seed: int) -> set[str]:
        shards = assemble_locally(
            corpus,
            tmp_path / name / "work",
            tmp_path / name / "out",
            target_size=5,
            rows_per_shard=2,
            seed=seed,
        )
        ids = [r["image_id"] for r in curated_rows(shards)]
        assert len(ids) == len(set(ids)) == 5
        return set(ids)

    first = sample("a", 0)
    assert first <= set(corpus["expected"])
    assert sample("b", 0) == first
    assert sample("c", 7) != first
    bigger = select(corpus["retrieve"], tmp_path / "d", target_size=100, rows_per_shard=2)
    assert bigger.rows == 13, "a target above the retrieved count keeps everything"


def test_curated_shards_load_with_datasets_as_images(corpus, tmp_path):
    import datasets
    from PIL import Image

    shards = assemble_locally(
        corpus, tmp_path / "work", tmp_path / "out", target_size=None, rows_per_shard=5
    )
    ds = datasets.load_dataset(
        "parquet",
        data_files=[str(p) for p in shards],
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == 13
    for column in (
        "image_id",
        "uri",
        "seed_set",
        "seed_id",
        "similarity",
        "method",
        "cluster_id",
        "matches",
        "width",
        "height",
    ):
        assert column in ds.column_names
    row = ds[0]
    assert isinstance(row["image"], Image.Image)
    expected = corpus["expected"][row["image_id"]]
    assert row["image"].size == Image.open(io.BytesIO(expected[7])).size
    assert row["seed_set"] == expected[0] and row["method"] == expected[2]


def test_bad_retrieve_shards_and_missing_bytes_are_named(corpus, tmp_path):
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"image_id": ["x"], "seed_set": ["s"]}), broken)
    with pytest.raises(SelectionError, match="lacks columns"):
        select([broken], tmp_path / "w1", target_size=None)
    odd = tmp_path / "odd.parquet"
    retrieve_shard(odd, [("s", "q", "x", 0, 0, 0, 0.5, "nearest", None)])
    with pytest.raises(SelectionError, match="'nearest' is not one of"):
        select([odd], tmp_path / "w2", target_size=None)
    with pytest.raises(ValueError, match="target_size"):
        select(corpus["retrieve"], tmp_path / "w3", target_size=0)

    # A retrieve row pointing at an image its ingest shard does not hold fails loudly.
    ghost = tmp_path / "ghost.parquet"
    retrieve_shard(ghost, [("alpha", "a0", "f" * 64, 0, 0, 0, 0.9, "knn", None)])
    selection = select([ghost], tmp_path / "w4", target_size=None)
    (source,) = selection.sources
    source = replace(source, ingest=corpus["ingest"][0])
    with pytest.raises(LookupError, match="no bytes in ingest shard .*part-000000"):
        scatter_source(source, tmp_path / "w4")


def test_dataset_card_and_stats(corpus, tmp_path):
    shards = assemble_locally(
        corpus, tmp_path / "work", tmp_path / "out", target_size=None, rows_per_shard=4
    )
    cluster = tmp_path / "cluster.parquet"
    sizes = {0: 1, 1: 3, 2: 5, 3: 5}
    pq.write_table(
        pa.table(
            {
                "image_id": [f"{k}-{i}" for k, n in sizes.items() for i in range(n)],
                "cluster_id": pa.array([k for k, n in sizes.items() for _ in range(n)], pa.int32()),
            }
        ),
        cluster,
    )
    selection = select(corpus["retrieve"], tmp_path / "work", target_size=None, rows_per_shard=4)
    report = {
        "job_id": JOB,
        "spec": {"source": "/crawl", "seeds": ["alpha", "beta"], "curated": {"seed": 0}},
        "stages": [
            {
                "stage": "ingest",
                "status": "done",
                "rows_in": 14,
                "rows_out": 13,
                "errors": 1,
                "errors_by_reason": {"timeout": 1},
                "seconds": 1.0,
                "metrics": {},
            },
            {
                "stage": "retrieve",
                "status": "done",
                "rows_in": 0,
                "rows_out": 17,
                "errors": 0,
                "errors_by_reason": {},
                "seconds": 1.0,
                "metrics": {
                    "seed_sets": [{"name": "beta", "policy": "as-is+cluster:10", "images": 3}]
                },
            },
            {
                "stage": "curated",
                "status": "done",
                "rows_in": 13,
                "rows_out": 13,
                "errors": 0,
                "errors_by_reason": {},
                "seconds": 1.0,
                "metrics": {"selection": selection.counts},
            },
        ],
    }
    stats = dataset_stats(report, curated=shards, cluster=[cluster])
    assert stats["curated"]["images"] == 13
    assert stats["curated"]["per_seed_set"] == {
        "alpha": {"knn": 5},
        "beta": {"as-is": 3, "cluster": 4, "knn": 1},
    }
    assert stats["curated"]["per_method"] == {"knn": 6, "as-is": 3, "cluster": 4}
    assert stats["collisions"]["collided_images"] == 4
    assert stats["stages"]["ingest"]["errors_by_reason"] == {"timeout": 1}
    assert stats["clusters"]["clusters"] == 4 and stats["clusters"]["images"] == 14
    assert stats["clusters"]["size_histogram"] == [
        {"min_size": 1, "max_size": 1, "clusters": 1},
        {"min_size": 2, "max_size": 3, "clusters": 1},
        {"min_size": 4, "max_size": 7, "clusters": 2},
    ]

    job_dir = tmp_path / "job"
    write_dataset_card(job_dir, stats, job_id=JOB, spec=report["spec"])
    assert json.loads((job_dir / "stats.json").read_text())["curated"]["images"] == 13
    card = (job_dir / "README.md").read_text()
    assert card.startswith("---\n") and "path: curated/part-*.parquet" in card
    assert "13 images" in card and "| beta | as-is+cluster:10 | 3 |" in card
    assert 'load_dataset("parquet"' in card and f"curate export webdataset {JOB}" in card


# -- on Ray, with the catalog ---------------------------------------------------------------------

# The curated stage in a fresh process that SIGKILLs itself before a chosen curated commit: that
# bucket's shard is renamed into place but not registered.
DRIVER = (
    KILL_HOOK
    + """
import json
from pathlib import Path

import ray

from tests.integration.test_assemble import run_curated

args = json.loads(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
run_curated(Path(args["root"]), args["options"])
"""
)


def register_job_inputs(catalog: Catalog, corpus: dict) -> None:
    """The corpus as job JOB's committed ingest and retrieve parts, with retrieval's pin of the
    seed set's ingest shards: what the curated stage reads of an earlier run."""
    for stage, shards in (
        ("ingest", sorted(corpus["ingest"].items())),
        ("retrieve", list(enumerate(corpus["retrieve"]))),
    ):
        for part, path in shards:
            rows = pq.read_metadata(path).num_rows
            info = ShardInfo(path, rows, path.stat().st_size, file_sha256(path))
            catalog.commit_part(JOB, stage, PartResult(part, rows, rows, {"data": info}))
    seeds = {n: {str(k): str(v) for k, v in m.items()} for n, m in corpus["seed_ingest"].items()}
    pin_seed_sets(catalog.data_root / "jobs" / JOB / "retrieve", {"seed_sets": [], "ingest": seeds})


def run_curated(root: Path, options: dict) -> None:
    """The curated stage of job JOB through the executor, as `curate run` runs it."""
    spec = parse_job_spec({"source": "/crawl", "job_id": JOB, "curated": options})
    settings = Settings(data_root=root, progress=False)
    catalog = Catalog(root / "catalog.duckdb", root)
    run_stage(CURATED_STAGE, JobRun(spec, settings, catalog, RayCompute(progress=False)))


def test_curated_stage_commits_each_bucket_once_and_resumes_after_sigkill(
    ray_local, corpus, tmp_path
):
    root = tmp_path / "data"
    catalog = Catalog(root / "catalog.duckdb", root)
    catalog.open_job(parse_job_spec({"source": "/crawl", "job_id": JOB}))
    register_job_inputs(catalog, corpus)
    out, work = root / "jobs" / JOB / "curated", root / "jobs" / JOB / "curated" / "_work"
    options = {"target_size": 12, "rows_per_shard": 3, "seed": 3}
    run_script_killed(
        DRIVER,
        [json.dumps({"root": str(root), "options": options})],
        "curated",
        after=1,
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
    )
    assert len(catalog.committed_parts(JOB, "curated")) == 1
    assert len(list(out.glob("part-*.parquet"))) > 1, "a shard is in place but unregistered"
    assert any(scatter_path(work, 0).parent.glob("*.arrow")), "scatter files wait for the resume"

    run_curated(root, options)
    metrics = stage_metrics(catalog)
    buckets = metrics["shards"]
    assert metrics["images"] == 12 and metrics["selection"]["selected"] == 12
    assert catalog.committed_parts(JOB, "curated") == set(range(buckets))
    shards = catalog.shard_paths(JOB, "curated")
    assert sorted(out.glob("*.parquet")) == shards, "no stray shard files"
    assert not list(out.glob(".*.tmp")) and not work.exists(), "intermediate files deleted"
    ids = [r["image_id"] for r in curated_rows(shards)]
    assert len(ids) == len(set(ids)) == 12 and set(ids) <= set(corpus["expected"])
    assert (root / "jobs" / JOB / "README.md").is_file(), "the dataset card is written"

    # The same options uninterrupted, in this process: the same shards, row for row.
    reference = assemble_locally(corpus, tmp_path / "ref-work", tmp_path / "ref", **options)
    for mine, theirs in zip(shards, reference, strict=True):
        assert pq.read_table(mine).equals(pq.read_table(theirs))

    # A finished stage re-run commits nothing new and rewrites nothing.
    written = {path: path.stat().st_mtime_ns for path in shards}
    run_curated(root, options)
    assert stage_metrics(catalog) == metrics
    assert catalog.committed_parts(JOB, "curated") == set(range(buckets))
    assert {path: path.stat().st_mtime_ns for path in shards} == written


def stage_metrics(catalog: Catalog) -> dict:
    (curated,) = [s for s in catalog.job_report(JOB)["stages"] if s["stage"] == "curated"]
    return curated["metrics"]
