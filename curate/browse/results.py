"""The results index of a job (see build.py): every row a results endpoint returns, computed once
from the stage outputs and stored as its JSON beside the keys it is looked up by.

A request then reads a few row groups of one column and joins the JSON texts: no per-item
conversion, no validation on the hot path (the tables' shapes are the REST contract's, which
the tests check against the response models). Floats are rounded to five digits: float32 values
otherwise print as 0.8999999761581421.
"""

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from curate.browse import seeds
from curate.browse.build import JobInputs, connect, copy_to_parquet
from curate.core import storage
from curate.core.atomic import write_json, write_text
from curate.stages.cluster.centroids import CENTROIDS
from schemas.job import StageName

NEAREST = 8  # crawl images shown per cluster card
MAX_GROUP_MEMBERS = 100  # a dedup group lists its first members; `size` says how many it has

# The stage outputs the build reads, and the columns it reads of each.
_TABLES = {
    "crawl": "image_id VARCHAR, cluster_id INTEGER, distance FLOAT",
    "seeds": "seed_set VARCHAR, image_id VARCHAR, cluster_id INTEGER, distance FLOAT",
    "retrieve": (
        "seed_set VARCHAR, seed_id VARCHAR, image_id VARCHAR, rank INTEGER, similarity FLOAT, "
        "method VARCHAR"
    ),
    "dedup": (
        "image_id VARCHAR, uri VARCHAR, part INTEGER, item INTEGER, keep BOOLEAN, reason VARCHAR, "
        "group_id VARCHAR, duplicate_of VARCHAR, similarity FLOAT"
    ),
}
_STAGE_OF = {"crawl": StageName.CLUSTER, "retrieve": StageName.RETRIEVE, "dedup": StageName.DEDUP}


def _r(column: str) -> str:
    return f"round({column}::DOUBLE, 5)"


def _load(con: duckdb.DuckDBPyConnection, inputs: JobInputs) -> np.ndarray | None:
    """The stage outputs as tables `crawl`, `seeds`, `retrieve`, `dedup` (empty when the stage
    is not done); returns the centroids when clustered."""
    for table, columns in _TABLES.items():
        con.execute(f"CREATE TABLE {table} ({columns})")
        stage = _STAGE_OF.get(table)
        paths = [path for _, path, _ in inputs.shards.get(stage, [])] if stage else []
        if stage and inputs.done(stage) and paths:
            names = ", ".join(column.split()[0] for column in columns.split(", "))
            con.register(f"{table}_shards", storage.dataset(paths))
            con.execute(f"INSERT INTO {table} SELECT {names} FROM {table}_shards")
    centroids_path = inputs.job_dir / StageName.CLUSTER / CENTROIDS
    if not (inputs.done(StageName.CLUSTER) and storage.exists(centroids_path)):
        return None
    centroids = np.load(storage.fetch(centroids_path))
    embed_options = inputs.spec.get("embed", {})
    embed = seeds.seed_embed_shards(
        inputs.pin,
        inputs.data_root,
        embed_options.get("arch", ""),
        int(embed_options.get("image_size", 0)),
    )
    con.register("places", seeds.place_seeds(embed, centroids))
    con.execute("INSERT INTO seeds SELECT * FROM places")
    return centroids


def _derived(con: duckdb.DuckDBPyConnection) -> None:
    """placed: where every crawl image and every seed image sits (a seed image that is also a
    crawl image sits where the crawl's copy does); seed_of: the seed sets of each image; picks:
    the retrieve rows of each image, best first."""
    con.execute(
        """
        CREATE TABLE placed AS
        SELECT image_id, cluster_id, distance FROM crawl
        UNION ALL
        SELECT image_id, min(cluster_id), min(distance)
        FROM seeds ANTI JOIN crawl USING (image_id) GROUP BY image_id
        """
    )
    con.execute(
        "CREATE TABLE seed_of AS SELECT image_id, list_sort(list(DISTINCT seed_set)) AS seed_sets "
        "FROM seeds GROUP BY image_id"
    )
    con.execute(
        f"""
        CREATE TABLE picks AS
        SELECT image_id,
               list(struct_pack(seed_set := seed_set, seed_id := seed_id, method := method,
                                similarity := {_r("similarity")}, rank := rank)
                    ORDER BY similarity DESC, seed_set, method, rank) AS picks
        FROM retrieve GROUP BY image_id
        """
    )


def _members(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    copy_to_parquet(
        con,
        f"""
        SELECT p.cluster_id,
               (row_number() OVER (PARTITION BY p.cluster_id ORDER BY p.distance, p.image_id)
                - 1)::INTEGER AS pos,
               to_json(struct_pack(image_id := p.image_id, distance := {_r("p.distance")},
                                   seed_set := s.seed_sets[1],
                                   retrieved := coalesce(k.picks, [])))::VARCHAR AS json
        FROM placed p LEFT JOIN seed_of s USING (image_id) LEFT JOIN picks k USING (image_id)
        ORDER BY p.cluster_id, pos
        """,
        folder / "members.parquet",
    )


def _count_by(rows: list[tuple]) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {}
    for cluster_id, name, n in rows:
        counts.setdefault(int(cluster_id), {})[name] = int(n)
    return counts


def _clusters(con: duckdb.DuckDBPyConnection, folder: Path, k: int) -> list[dict]:
    """clusters.parquet: a card per centroid (empty clusters too: they may hold seeds)."""
    sizes = dict(con.execute("SELECT cluster_id, count(*) FROM crawl GROUP BY 1").fetchall())
    by_seed_set = _count_by(
        con.execute(
            "SELECT cluster_id, seed_set, count(DISTINCT image_id) FROM seeds GROUP BY ALL"
        ).fetchall()
    )
    coverage = dict(
        con.execute("SELECT cluster_id, count(DISTINCT image_id) FROM seeds GROUP BY 1").fetchall()
    )
    by_method = _count_by(
        con.execute(
            "SELECT p.cluster_id, r.method, count(DISTINCT r.image_id) "
            "FROM retrieve r JOIN placed p USING (image_id) GROUP BY ALL"
        ).fetchall()
    )
    nearest: dict[int, list[str]] = {}
    for cluster_id, image_id in con.execute(
        f"""
        SELECT cluster_id, image_id FROM crawl
        QUALIFY row_number() OVER (PARTITION BY cluster_id ORDER BY distance, image_id) <= {NEAREST}
        ORDER BY cluster_id, distance, image_id
        """
    ).fetchall():
        nearest.setdefault(int(cluster_id), []).append(image_id)
    cards = [
        {
            "cluster_id": c,
            "size": int(sizes.get(c, 0)),
            "seed_coverage": int(coverage.get(c, 0)),
            "seeds": dict(sorted(by_seed_set.get(c, {}).items())),
            "retrieved": dict(sorted(by_method.get(c, {}).items())),
            "nearest": nearest.get(c, []),
        }
        for c in sorted(set(range(k)) | set(sizes) | set(coverage))
    ]
    by_size = sorted(cards, key=lambda r: (-r["size"], r["cluster_id"]))
    by_coverage = sorted(cards, key=lambda r: (-r["seed_coverage"], -r["size"], r["cluster_id"]))
    size_pos = {card["cluster_id"]: pos for pos, card in enumerate(by_size)}
    coverage_pos = {card["cluster_id"]: pos for pos, card in enumerate(by_coverage)}
    # Where each cluster's rows are in members.parquet (sorted by cluster, then distance).
    counts = dict(con.execute("SELECT cluster_id, count(*) FROM placed GROUP BY 1").fetchall())
    starts = np.cumsum([0] + [counts.get(c["cluster_id"], 0) for c in cards])
    table = pa.table(
        {
            "cluster_id": pa.array([c["cluster_id"] for c in cards], pa.int32()),
            "size_pos": pa.array([size_pos[c["cluster_id"]] for c in cards], pa.int32()),
            "coverage_pos": pa.array([coverage_pos[c["cluster_id"]] for c in cards], pa.int32()),
            "members_start": pa.array(starts[:-1], pa.int64()),
            "members_count": pa.array(np.diff(starts), pa.int64()),
            "json": [json.dumps(c, separators=(",", ":")) for c in cards],
        }
    )
    con.register("cards", table)
    copy_to_parquet(con, "SELECT * FROM cards ORDER BY cluster_id", folder / "clusters.parquet")
    return cards


def centroid_map(centroids: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """2-D PCA of the centroids: coordinates [k, 2] and the share of variance each axis holds.
    Signs are fixed (largest loading positive) so a rebuilt map looks the same."""
    x = centroids.astype(np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    coords = np.zeros((len(x), 2))
    if len(x) < 2:
        return coords, [0.0, 0.0]
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    axes = min(2, len(s))
    for a in range(axes):
        if vt[a, np.argmax(np.abs(vt[a]))] < 0:
            vt[a] = -vt[a]
    coords[:, :axes] = x @ vt[:axes].T
    total = float((s**2).sum()) or 1.0
    explained = [float(s[a] ** 2 / total) if a < axes else 0.0 for a in range(2)]
    return coords, explained


def _map(folder: Path, centroids: np.ndarray, cards: list[dict]) -> None:
    coords, explained = centroid_map(centroids)
    card = {c["cluster_id"]: c for c in cards}
    points = [
        {
            "cluster_id": c,
            "x": round(float(coords[c, 0]), 5) + 0.0,  # + 0.0: no -0.0 in the JSON
            "y": round(float(coords[c, 1]), 5) + 0.0,
            "size": card[c]["size"],
            "seed_coverage": card[c]["seed_coverage"],
        }
        for c in range(len(centroids))
    ]
    # Compact: 100,000 clusters make a map of megabytes, sent whole.
    body = {"clusters": points, "explained_variance": explained}
    write_text(folder / "map.json", json.dumps(body, separators=(",", ":")))


def _images(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    """images.parquet: each image's provenance, by image_id."""
    copy_to_parquet(
        con,
        f"""
        WITH ids AS (SELECT image_id FROM placed UNION SELECT image_id FROM dedup
                     UNION SELECT image_id FROM retrieve),
        decisions AS (
            SELECT image_id,
                   first(struct_pack(keep := keep, reason := reason, group_id := group_id,
                                     duplicate_of := duplicate_of,
                                     similarity := {_r("similarity")})
                         ORDER BY part, item) AS first,
                   count(*) AS occurrences
            FROM dedup GROUP BY image_id)
        SELECT i.image_id, s.seed_sets,
               to_json(struct_pack(
                   image_id := i.image_id, cluster_id := p.cluster_id,
                   distance := {_r("p.distance")}, seed_sets := coalesce(s.seed_sets, []),
                   picked_by := coalesce(k.picks, []),
                   dedup := CASE WHEN d.first IS NULL THEN NULL ELSE struct_pack(
                       keep := d.first.keep, reason := d.first.reason,
                       group_id := d.first.group_id, duplicate_of := d.first.duplicate_of,
                       similarity := d.first.similarity, occurrences := d.occurrences) END
               ))::VARCHAR AS json
        FROM ids i LEFT JOIN placed p USING (image_id) LEFT JOIN seed_of s USING (image_id)
             LEFT JOIN picks k USING (image_id) LEFT JOIN decisions d USING (image_id)
        ORDER BY i.image_id
        """,
        folder / "images.parquet",
    )


def _neighbours(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    """neighbours.parquet: what each seed image retrieved, by `seed_set/seed_id`, best first
    (as-is rows are the seed itself, not a neighbour)."""
    copy_to_parquet(
        con,
        f"""
        SELECT r.seed_set || '/' || r.seed_id AS key,
               to_json(struct_pack(image_id := r.image_id, similarity := {_r("r.similarity")},
                                   rank := r.rank, method := r.method,
                                   cluster_id := p.cluster_id))::VARCHAR AS json
        FROM retrieve r LEFT JOIN placed p USING (image_id)
        WHERE r.seed_id IS NOT NULL AND r.method <> 'as-is'
        ORDER BY key, r.similarity DESC, r.method, r.rank, r.image_id
        """,
        folder / "neighbours.parquet",
    )


def _groups(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    """groups.parquet: dedup groups, largest first; an evaluation-set copy is a group of its
    own, its representative the removed image (what it copies is in duplicate_of)."""
    copy_to_parquet(
        con,
        f"""
        WITH d AS (SELECT *, coalesce(group_id, image_id) AS g FROM dedup
                   WHERE group_id IS NOT NULL OR NOT keep),
        groups AS (
            SELECT g AS group_id, count(*) AS size,
                   list_sort(list(DISTINCT reason) FILTER (WHERE reason IS NOT NULL)) AS reasons,
                   list(struct_pack(image_id := image_id, uri := uri, keep := keep,
                                    reason := reason, similarity := {_r("similarity")},
                                    duplicate_of := duplicate_of)
                        ORDER BY (image_id = g AND keep) DESC, part, item) AS members
            FROM d GROUP BY g)
        SELECT (row_number() OVER (ORDER BY size DESC, group_id) - 1)::INTEGER AS pos, reasons,
               to_json(struct_pack(group_id := group_id, representative := group_id,
                                   size := size, reasons := reasons,
                                   members := members[1:{MAX_GROUP_MEMBERS}]))::VARCHAR AS json
        FROM groups ORDER BY pos
        """,
        folder / "groups.parquet",
    )


def build_results(inputs: JobInputs, folder: Path) -> None:
    """Every table of the results index, into `folder` (build.publish_index renames it into
    place)."""
    tables = ["images"]
    with connect() as con:
        centroids = _load(con, inputs)
        _derived(con)
        if centroids is not None:
            _members(con, folder)
            _map(folder, centroids, _clusters(con, folder, len(centroids)))
            tables += ["clusters", "members", "map"]
        _images(con, folder)
        if inputs.done(StageName.RETRIEVE):
            _neighbours(con, folder)
            tables.append("neighbours")
        if inputs.done(StageName.DEDUP):
            _groups(con, folder)
            tables.append("groups")
    seed_sets = [entry["name"] for entry in (inputs.pin or {}).get("seed_sets", [])]
    write_json(
        folder / "meta.json",
        {"job_id": inputs.job_id, "tables": sorted(tables), "seed_sets": seed_sets},
    )
