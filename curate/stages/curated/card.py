"""The dataset card of a curated job: job_dir/README.md (Hugging Face style) and stats.json,
from the catalog's report and the curated and cluster shards."""

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from curate.core import storage
from curate.core.atomic import write_json, write_text
from schemas.job import StageName


def _size_histogram(sizes: Iterable[int]) -> list[dict[str, int]]:
    """Clusters per size range, in powers of two: 1, 2-3, 4-7, ..."""
    bins: dict[int, int] = {}
    for size in sizes:
        bins[size.bit_length() - 1] = bins.get(size.bit_length() - 1, 0) + 1
    return [
        {"min_size": 1 << b, "max_size": (1 << (b + 1)) - 1, "clusters": bins[b]}
        for b in sorted(bins)
    ]


def _curated_stats(con: duckdb.DuckDBPyConnection, curated: list[Path]) -> dict[str, Any]:
    if not curated:
        return {"images": 0, "shards": 0, "per_seed_set": {}, "per_method": {}}
    # Only the small columns are read: the image bytes never leave the files (nor the store).
    con.register("curated_shards", storage.dataset(curated))
    source = "curated_shards"
    images, similarity_mean, width, height, collided = con.execute(
        f"""
        SELECT count(*), avg(similarity), median(width), median(height),
               count(*) FILTER (WHERE matches > 1)
        FROM {source}
        """
    ).fetchone()
    per_set = con.execute(
        f"SELECT seed_set, method, count(*) FROM {source} GROUP BY ALL ORDER BY 1, 2"
    ).fetchall()
    per_seed_set: dict[str, dict[str, int]] = {}
    per_method: dict[str, int] = {}
    for seed_set, method, n in per_set:
        per_seed_set.setdefault(seed_set, {})[method] = int(n)
        per_method[method] = per_method.get(method, 0) + int(n)
    return {
        "images": int(images),
        "shards": len(curated),
        "bytes": sum(storage.size(p) or 0 for p in curated),
        "mean_similarity": round(float(similarity_mean), 4) if images else None,
        "median_width": float(width) if images else None,
        "median_height": float(height) if images else None,
        "images_with_several_matches": int(collided),
        "per_seed_set": per_seed_set,
        "per_method": per_method,
    }


def _cluster_stats(con: duckdb.DuckDBPyConnection, cluster: list[Path]) -> dict[str, Any]:
    if not cluster:
        return {"clusters": 0, "images": 0, "size_histogram": []}
    con.register("cluster_shards", storage.dataset(cluster))
    sizes = [
        int(n)
        for (n,) in con.execute(
            "SELECT count(*) FROM cluster_shards GROUP BY cluster_id ORDER BY 1"
        ).fetchall()
    ]
    return {
        "clusters": len(sizes),
        "images": sum(sizes),
        "min_size": sizes[0],
        "median_size": sizes[len(sizes) // 2],
        "max_size": sizes[-1],
        "size_histogram": _size_histogram(sizes),
    }


def dataset_stats(
    report: dict[str, Any], *, curated: list[Path], cluster: list[Path]
) -> dict[str, Any]:
    """The dataset card's numbers: per stage (from the catalog's job report), per seed set and
    method (from the curated shards), collisions, and the crawl's cluster-size histogram."""
    stages = {
        s["stage"]: {
            key: s.get(key)
            for key in ("status", "rows_in", "rows_out", "errors", "errors_by_reason", "seconds")
        }
        for s in report.get("stages", [])
    }
    metrics = {s["stage"]: s.get("metrics") or {} for s in report.get("stages", [])}
    con = duckdb.connect(":memory:")
    try:
        curated_stats = _curated_stats(con, [Path(p) for p in curated])
        cluster_stats = _cluster_stats(con, [Path(p) for p in cluster])
    finally:
        con.close()
    selection = metrics.get(StageName.CURATED, {}).get("selection", {})
    return {
        "job_id": report.get("job_id"),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "stages": stages,
        "seed_sets": metrics.get(StageName.RETRIEVE, {}).get("seed_sets", []),
        "embed_model": metrics.get(StageName.EMBED, {}).get("model"),
        "copy_model": _copy_model(metrics.get(StageName.DEDUP, {})),
        "random_weights": bool(metrics.get(StageName.EMBED, {}).get("random_weights")),
        "collisions": selection.get("collisions")
        or metrics.get(StageName.RETRIEVE, {}).get("collisions"),
        "selection": selection,
        "curated": curated_stats,
        "clusters": cluster_stats,
    }


def _copy_model(dedup: dict[str, Any]) -> dict[str, Any]:
    """The dedup stage's copy model and the thresholds it ran at (with where each came from)."""
    keys = ("copy_threshold", "copy_threshold_source", "eval_threshold", "eval_threshold_source")
    return {**(dedup.get("copy_model") or {}), **{k: dedup[k] for k in keys if k in dedup}}


def _copy_model_text(copy_model: dict[str, Any]) -> str:
    if not copy_model.get("summary"):
        return "copy detection was skipped (no copy-descriptor weights)"
    text = f"copy model: {copy_model['summary']}"
    if "copy_threshold" in copy_model:
        text += (
            f"; copies above cosine {copy_model['copy_threshold']:.2f} "
            f"({copy_model['copy_threshold_source']}), eval-set copies above "
            f"{copy_model['eval_threshold']:.2f} ({copy_model['eval_threshold_source']})"
        )
    calibration = copy_model.get("calibration") or {}
    if calibration:
        at = calibration.get("at_copy_threshold", {})
        text += (
            f"; calibrated on {calibration.get('set')}: pair precision "
            f"{at.get('pair_precision', 0):.3f}, easy-edit recall {at.get('easy_recall', 0):.3f}, "
            f"hard-geometric recall {at.get('hard_geometric_recall', 0):.3f} there"
        )
    return text


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _size_category(n: int) -> str:
    for limit, name in [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
    ]:
        if n < limit:
            return name
    return "1B<n<10B"


def dataset_card(stats: dict[str, Any], *, job_id: str, spec: dict[str, Any]) -> str:
    """The Markdown text of a Hugging Face-style dataset card for a curated job."""
    curated = stats.get("curated", {})
    images = int(curated.get("images", 0))
    stage_rows = [
        [name, s.get("status"), s.get("rows_in"), s.get("rows_out"), s.get("errors")]
        for name, s in stats.get("stages", {}).items()
    ]
    policies = {s.get("name"): s for s in stats.get("seed_sets", [])}
    set_rows = [
        [
            name,
            policies.get(name, {}).get("policy", ""),
            policies.get(name, {}).get("images", ""),
            ", ".join(f"{m}: {n}" for m, n in sorted(methods.items())),
            sum(methods.values()),
        ]
        for name, methods in sorted(curated.get("per_seed_set", {}).items())
    ]
    collisions = stats.get("collisions") or {}
    clusters = stats.get("clusters", {})
    histogram = [
        [f"{b['min_size']}-{b['max_size']}", b["clusters"]]
        for b in clusters.get("size_histogram", [])
    ]
    curated_opts = spec.get("curated") or {}
    arch = f"`{(spec.get('embed') or {}).get('arch', 'unknown model')}`"
    if stats.get("random_weights"):
        # Said first and loudly: such a dataset must never be mistaken for a curated one.
        arch += (
            " **with random weights — this dataset demonstrates the pipeline; its selection is "
            "meaningless**"
        )
    target = curated_opts.get("target_size")
    sampling = (
        f"a uniform sample of at most {target:,} images" if target else "no target size (all kept)"
    )
    collisions_text = (
        f"Collisions: {collisions.get('collided_images', 0):,} images were retrieved by more "
        f"than one retrieve row ({collisions.get('extra_rows', 0):,} extra rows), "
        f"{collisions.get('cross_set_images', 0):,} of them by more than one seed set. Each "
        "appears once; `matches` counts the rows that picked it."
    )
    if clusters.get("clusters"):
        clusters_text = (
            f"Crawl clusters: {clusters['clusters']:,} over {clusters['images']:,} images, sizes "
            f"{clusters['min_size']:,} to {clusters['max_size']:,} (median "
            f"{clusters['median_size']:,}).\n\n" + _table(["cluster size", "clusters"], histogram)
        )
    else:
        clusters_text = "Crawl clusters: none recorded."
    seeds = spec.get("seeds") or []
    front_matter = "\n".join(
        [
            "---",
            f"pretty_name: {job_id} (lvd-curate)",
            "task_categories:",
            "- image-feature-extraction",
            "size_categories:",
            f"- {_size_category(images)}",
            "configs:",
            "- config_name: default",
            "  data_files:",
            "  - split: train",
            "    path: curated/part-*.parquet",
            "---",
        ]
    )
    return f"""{front_matter}

# {job_id}: an LVD-style curated image dataset

{images:,} images curated by lvd-curate from the crawl `{spec.get("source")}`
with the seed sets {", ".join(f"`{s}`" for s in seeds) or "(none)"}, following the recipe that
built LVD-142M for DINOv2 (Oquab et al. 2023, appendix A): crawl images are deduplicated, embedded
with a self-supervised ViT, clustered, and retrieved for their resemblance to curated seed sets.

## How it was made

1. **ingest**: every source item fetched, decoded and validated; identity = SHA-256 of the bytes.
2. **dedup**: exact duplicates, PCA-hash near duplicates, SSCD-style copies and copies of
   evaluation sets removed; {_copy_model_text(stats.get("copy_model") or {})}.
3. **embed**: L2-normalised embeddings of every kept image ({arch}).
4. **cluster**: spherical k-means of the crawl's embeddings.
5. **retrieve**: per seed set, its policy: `as-is` (the seed images themselves), `knn:K` (the K
   nearest crawl images of each seed image), `cluster:M` (M images from each cluster holding
   enough seed images) or `balanced:N` (hierarchical k-means, balanced sampling).
6. **curated**: each image kept once, credited to its best match (highest similarity);
   {sampling}; shuffled into shards (seed {curated_opts.get("seed", 0)}).

{_table(["stage", "status", "rows in", "rows out", "errors"], stage_rows)}

## Contents

{_table(["seed set", "policy", "seed images", "curated images by method", "total"], set_rows)}

{collisions_text}

{clusters_text}

## Columns

| column | meaning |
|---|---|
| `image` | the image (`datasets` Image feature: original bytes and a file name) |
| `image_id` | hex SHA-256 of the bytes |
| `uri` | where the image came from |
| `seed_set`, `seed_id` | the best match's seed set and seed image (null for cluster picks) |
| `similarity` | cosine similarity of the best match (to the seed, or to the cluster centroid) |
| `method` | `as-is`, `knn`, `cluster` or `balanced` |
| `cluster_id` | the crawl cluster of the best match, when known |
| `matches` | retrieve rows that picked the image |
| `width`, `height` | pixels |

## How to use it

```python
from datasets import load_dataset

ds = load_dataset("parquet", data_files="curated/part-*.parquet", split="train")
ds[0]["image"]  # a PIL image
```

```sh
curate export webdataset {job_id} webdataset/      # WebDataset tars: <key>.jpg + <key>.json
curate train run --data {job_id} --out train/       # DINOv2-style self-supervised training
```

```python
import glob
import webdataset as wds

tars = sorted(glob.glob("webdataset/*.tar"))
ds = wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "json")
```

## Licensing and limitations

The images keep the rights of their sources (see `uri`); this card does not grant any. Retrieval
with random-weight models (tests, demo) produces meaningless selections. Full numbers are in
`stats.json` next to this card.
"""


def write_dataset_card(
    job_dir: Path, stats: dict[str, Any], *, job_id: str, spec: dict[str, Any]
) -> None:
    """Write job_dir/README.md (a Hugging Face-style dataset card) and job_dir/stats.json."""
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / "stats.json", stats)
    write_text(job_dir / "README.md", dataset_card(stats, job_id=job_id, spec=spec))
