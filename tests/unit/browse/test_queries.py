"""The results queries on the tiny job (conftest.py says what it holds)."""

import json
import shutil

import numpy as np
import pytest

from curate.browse import queries as q
from curate.browse.errors import (
    ClusterNotFound,
    ImageNotFound,
    ResultsNotFound,
    SeedNotFound,
)
from curate.browse.results import centroid_map
from curate.browse.store import Browser
from curate.catalog import JobNotFound
from schemas.api import InvalidField, encode_cursor
from schemas.job import parse_job_spec


@pytest.fixture(scope="module")
def browse(tiny):
    browser = Browser(tiny.settings, tiny.catalog)
    return browser, browser.results("tiny"), browser.cursor()


def _all_pages(fetch, limit):
    items, cursor, pages = [], None, 0
    while True:
        page = fetch(limit, cursor)
        items += page.items
        pages += 1
        if page.next_cursor is None:
            return items, pages
        cursor = page.next_cursor


def test_clusters_by_size_and_by_seed_coverage(tiny, browse):
    _, index, db = browse
    by_size, pages = _all_pages(lambda n, c: q.clusters(index, "size", n, c), 2)
    assert pages == 2 and [c["cluster_id"] for c in by_size] == [0, 1, 2]
    first = by_size[0]
    assert first["size"] == 3 and first["seeds"] == {"pets": 2} and first["seed_coverage"] == 2
    # Distinct images per method: knn picked A and B; as-is holds s0 (= S0) and s1.
    assert first["retrieved"] == {"as-is": 2, "knn": 2}
    assert first["nearest"] == [tiny.id("A"), tiny.id("S0"), tiny.id("B")]
    by_coverage = q.clusters(index, "seed_coverage", 10, None).items
    assert [(c["cluster_id"], c["seed_coverage"]) for c in by_coverage] == [(0, 2), (2, 1), (1, 0)]
    assert by_coverage[1]["retrieved"] == {"as-is": 1, "knn": 2}


def test_members_are_ordered_by_distance_with_seeds_and_picks(tiny, browse):
    _, index, db = browse
    items, pages = _all_pages(lambda n, c: q.members(index, 0, n, c), 3)
    assert pages == 2
    # s1 is a seed image placed in cluster 0 (1 - 0.9 / |(0.9, 0.1)|); S0 is the crawl's copy
    # of seed s0.
    assert [m["image_id"] for m in items] == [tiny.id(n) for n in ("s1", "A", "S0", "B")]
    assert [m["seed_set"] for m in items] == ["pets", None, "pets", None]
    assert items[0]["distance"] == pytest.approx(1 - 0.9 / np.hypot(0.9, 0.1), abs=1e-3)
    a = items[1]
    assert [(p["seed_id"], p["method"], p["similarity"], p["rank"]) for p in a["retrieved"]] == [
        (tiny.id("s0"), "knn", 0.95, 0),
        (tiny.id("s1"), "knn", 0.9, 0),
    ]
    assert [m["image_id"] for m in q.members(index, 2, 50, None).items] == [
        tiny.id(n) for n in ("s2", "G", "F")
    ]


def test_unknown_cluster_and_bad_cursor(browse):
    _, index, db = browse
    with pytest.raises(ClusterNotFound):
        q.members(index, 99, 10, None)
    assert q.members(index, 0, 10, encode_cursor([4])).items == []  # past the end
    for bad in ("nonsense!", encode_cursor([-1]), encode_cursor(["x"]), encode_cursor([1, 2])):
        with pytest.raises(InvalidField) as caught:
            q.clusters(index, "size", 10, bad)
        assert caught.value.field == "query.cursor" and caught.value.code == "cursor_invalid"


def test_neighbours_of_a_seed(tiny, browse):
    _, index, db = browse
    found = q.neighbours(index, "pets", tiny.id("s0")).value
    assert found["seed_id"] == tiny.id("s0")
    assert [
        (n["image_id"], n["similarity"], n["rank"], n["method"], n["cluster_id"])
        for n in found["items"]
    ] == [(tiny.id("A"), 0.95, 0, "knn", 0), (tiny.id("C"), 0.8, 1, "knn", 1)]
    with pytest.raises(SeedNotFound):
        q.neighbours(index, "pets", tiny.id("A"))  # a crawl image, not a seed
    with pytest.raises(SeedNotFound):
        q.neighbours(index, "birds", tiny.id("s0"))


def test_provenance_of_crawl_images(tiny, browse):
    _, index, db = browse
    a = q.provenance(index, tiny.id("A")).value
    assert a["cluster_id"] == 0 and a["seed_sets"] == []
    assert [p["seed_id"] for p in a["picked_by"]] == [tiny.id("s0"), tiny.id("s1")]
    assert a["dedup"] == {
        "keep": True,
        "reason": None,
        "group_id": tiny.id("A"),
        "duplicate_of": None,
        "similarity": None,
        "occurrences": 2,
    }
    d = q.provenance(index, tiny.id("D")).value
    assert d["cluster_id"] is None and d["picked_by"] == []
    assert d["dedup"]["reason"] == "copy" and d["dedup"]["duplicate_of"] == tiny.id("B")
    assert d["dedup"]["similarity"] == pytest.approx(0.93)
    s0 = q.provenance(index, tiny.id("s0")).value
    assert s0["seed_sets"] == ["pets"] and s0["picked_by"][0]["method"] == "as-is"
    with pytest.raises(ImageNotFound):
        q.provenance(index, "0" * 64)


def test_dedup_groups_put_the_representative_first(tiny, browse):
    _, index, db = browse
    groups, _ = _all_pages(lambda n, c: q.dedup_groups(db, index, None, n, c), 1)
    assert len(groups) == 4
    by_id = {g["group_id"]: g for g in groups}
    b = by_id[tiny.id("B")]
    assert b["representative"] == tiny.id("B") and b["size"] == 2
    assert [(m["image_id"], m["keep"], m["reason"]) for m in b["members"]] == [
        (tiny.id("B"), True, None),
        (tiny.id("D"), False, "copy"),
    ]
    # An eval-set copy is a group of its own, naming the evaluation image it copies.
    e = groups[-1]
    assert e["group_id"] == tiny.id("E") and e["members"][0]["duplicate_of"].startswith("evalx:")
    exact = q.dedup_groups(db, index, "exact", 50, None).items
    assert sorted(g["group_id"] for g in exact) == sorted([tiny.id("A"), tiny.id("C")])
    assert q.dedup_groups(db, index, "pca_hash", 50, None).items == []


def test_map_is_the_pca_of_the_centroids(browse):
    _, index, _ = browse
    points = q.cluster_map(index).value["clusters"]
    assert [(p["cluster_id"], p["size"], p["seed_coverage"]) for p in points] == [
        (0, 3, 2),
        (1, 3, 0),
        (2, 2, 1),
    ]
    coords, explained = centroid_map(np.eye(3, 4))
    # Three orthonormal centroids: centred, they span a plane holding all their variance.
    assert sum(explained) == pytest.approx(1.0)
    distances = [np.linalg.norm(coords[i] - coords[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert distances == pytest.approx([np.sqrt(2)] * 3)


def test_curated_stats_and_missing_results(tiny, browse, tmp_path):
    browser, _, _ = browse
    assert q.curated_stats(browser.job_dir("tiny"), "tiny").value["images"] == 9
    with pytest.raises(ResultsNotFound):
        q.curated_stats(tmp_path, "tiny")
    with pytest.raises(JobNotFound):
        browser.results("nope")


def test_a_job_with_nothing_done_has_no_results(fresh_tiny):
    tiny = fresh_tiny
    tiny.catalog.open_job(parse_job_spec({"job_id": "fresh", "source": "/x"}))
    tiny.catalog.start_stage("fresh", "ingest", 3)
    browser = Browser(tiny.settings, tiny.catalog)
    with pytest.raises(ResultsNotFound, match="ingest running"):
        browser.results("fresh")


def test_the_index_is_rebuilt_when_a_stage_changes_and_old_versions_go(fresh_tiny):
    tiny = fresh_tiny
    browser = Browser(tiny.settings, tiny.catalog, recheck_s=0.0, settled_s=0.0)
    first = browser.results("tiny").folder
    assert browser.results("tiny").folder == first  # unchanged catalog: the same index
    # The retrieve stage re-opened (a resumed job): its rows no longer count.
    tiny.catalog.start_stage("tiny", "retrieve", 2)
    second = browser.results("tiny")
    assert second.folder != first and "neighbours" not in second.meta["tables"]
    assert q.clusters(second, "size", 1, None).items[0]["retrieved"] == {}
    tiny.catalog.finish_stage("tiny", "retrieve", "done", 0.0)
    third = browser.results("tiny").folder
    assert third == first  # the same inputs again: the same name, already built
    folders = sorted(p.name for p in (tiny.job_dir / "browse").iterdir())
    assert len([f for f in folders if f.startswith("results-")]) == 2
    meta = json.loads((third / "meta.json").read_text())
    assert meta["seed_sets"] == ["pets"]


def test_a_deleted_job_is_not_found_at_once(fresh_tiny):
    browser = Browser(fresh_tiny.settings, fresh_tiny.catalog)  # re-reads settled jobs every 5 s
    assert q.members(browser.results("tiny"), 0, 5, None).items
    fresh_tiny.catalog.delete_job("tiny")
    shutil.rmtree(fresh_tiny.job_dir)
    with pytest.raises(JobNotFound):
        browser.results("tiny")
    with pytest.raises(JobNotFound):
        browser.locate(fresh_tiny.id("A"), "tiny")
