"""Every results endpoint on the demo job, over HTTP against the real app."""

import json

import pytest

from curate.browse.build import BROWSE_DIR


def _pages(client, url: str, limit: int, **params) -> tuple[list[dict], int]:
    items, cursor, pages = [], None, 0
    while True:
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        response = client.get(url, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        items += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages


@pytest.fixture(scope="module")
def job(demo_job) -> str:
    return demo_job["job_id"]


@pytest.fixture(scope="module")
def clusters(client, job) -> list[dict]:
    items, _ = _pages(client, f"/v1/jobs/{job}/clusters", 7)
    return items


def test_clusters_cover_every_clustered_image(client, demo_job, job, clusters):
    cluster_stage = next(s for s in demo_job["stages"] if s["stage"] == "cluster")
    assert sum(c["size"] for c in clusters) == cluster_stage["rows_out"]
    sizes = [c["size"] for c in clusters]
    assert sizes == sorted(sizes, reverse=True)
    assert all(len(c["nearest"]) <= 8 for c in clusters)
    assert sum(c["seed_coverage"] for c in clusters) > 0  # the demo's seeds land somewhere
    assert all(set(c["seeds"]) <= {"demo"} for c in clusters)
    by_coverage, _ = _pages(client, f"/v1/jobs/{job}/clusters", 50, sort="seed_coverage")
    coverage = [c["seed_coverage"] for c in by_coverage]
    assert coverage == sorted(coverage, reverse=True)
    assert sorted(c["cluster_id"] for c in by_coverage) == sorted(c["cluster_id"] for c in clusters)
    methods = {m for c in clusters for m in c["retrieved"]}
    assert {"knn", "as-is"} <= methods


def test_members_page_by_distance(client, job, clusters):
    largest = clusters[0]
    members, pages = _pages(client, f"/v1/jobs/{job}/clusters/{largest['cluster_id']}/members", 4)
    assert pages > 1
    distances = [m["distance"] for m in members]
    assert distances == sorted(distances)
    crawl = [m for m in members if m["seed_set"] is None]
    assert len({m["image_id"] for m in members}) == len(members)
    assert len(crawl) <= largest["size"] <= len(members)
    assert [m["image_id"] for m in members if m["image_id"] in largest["nearest"]][:1] == [
        largest["nearest"][0]
    ]


def _a_knn_pick(client, job, clusters) -> tuple[str, dict]:
    for cluster in clusters:
        members, _ = _pages(client, f"/v1/jobs/{job}/clusters/{cluster['cluster_id']}/members", 500)
        for member in members:
            for pick in member["retrieved"]:
                if pick["method"] == "knn":
                    return member["image_id"], pick
    raise AssertionError("the demo job retrieved nothing by knn")


def test_a_seed_and_the_images_it_picked(client, job, clusters):
    image_id, pick = _a_knn_pick(client, job, clusters)
    found = client.get(f"/v1/jobs/{job}/seeds/{pick['seed_set']}/{pick['seed_id']}/neighbours")
    assert found.status_code == 200, found.text
    neighbours = found.json()["items"]
    assert image_id in [n["image_id"] for n in neighbours]
    assert all(n["method"] in ("knn", "cluster", "balanced") for n in neighbours)
    knn = [n for n in neighbours if n["method"] == "knn"]
    assert sorted(n["rank"] for n in knn) == list(range(len(knn))) and len(knn) <= 4
    provenance = client.get(f"/v1/jobs/{job}/images/{image_id}/provenance").json()
    assert pick in provenance["picked_by"]
    assert provenance["cluster_id"] is not None and provenance["dedup"]["keep"] is True
    # The seed image itself: a member of the demo seed set.
    seed = client.get(f"/v1/jobs/{job}/images/{pick['seed_id']}/provenance").json()
    assert seed["seed_sets"] == ["demo"]


def test_dedup_groups_show_the_representative_first(client, job):
    groups, _ = _pages(client, f"/v1/jobs/{job}/dedup/groups", 10)
    assert groups, "the demo corpus plants duplicates"
    for group in groups:
        first = group["members"][0]
        assert first["image_id"] == group["representative"]
        if group["reasons"] != ["eval_contamination"]:
            assert first["keep"] is True and first["reason"] is None
        removed = group["members"][1:]
        assert all(m["keep"] is False and m["reason"] for m in removed)
        assert all(m["duplicate_of"] for m in removed)
    reasons = {r for g in groups for r in g["reasons"]}
    for reason in reasons:
        only, _ = _pages(client, f"/v1/jobs/{job}/dedup/groups", 50, reason=reason)
        assert only and all(reason in g["reasons"] for g in only)
    # An exact repeat shares its representative's id (whose first occurrence stays); any
    # other removed image's provenance says why it went.
    removed = next(
        m for g in groups for m in g["members"][1:] if m["image_id"] != g["representative"]
    )
    provenance = client.get(f"/v1/jobs/{job}/images/{removed['image_id']}/provenance").json()
    assert provenance["dedup"]["keep"] is False
    assert provenance["dedup"]["reason"] == removed["reason"]
    assert provenance["cluster_id"] is None


def test_map_and_curated_stats(client, api_server, job, clusters):
    points = client.get(f"/v1/jobs/{job}/map").json()["clusters"]
    assert sorted(p["cluster_id"] for p in points) == sorted(c["cluster_id"] for c in clusters)
    by_id = {c["cluster_id"]: c for c in clusters}
    assert all(p["size"] == by_id[p["cluster_id"]]["size"] for p in points)
    job_dir = api_server.settings.job_dir(job)
    assert len(list((job_dir / BROWSE_DIR).glob("results-*/map.json"))) == 1  # cached
    stats = client.get(f"/v1/jobs/{job}/curated")
    assert stats.status_code == 200
    assert stats.json() == json.loads((job_dir / "stats.json").read_text())


def test_read_tokens_browse(api_server, read_token, job):
    with api_server.client(read_token) as reader:
        assert reader.get(f"/v1/jobs/{job}/clusters").status_code == 200
    with api_server.client() as anonymous:
        assert anonymous.get(f"/v1/jobs/{job}/clusters").status_code == 401


@pytest.mark.parametrize(
    "path, status, code",
    [
        ("/v1/jobs/nope/clusters", 404, "job_not_found"),
        ("/v1/jobs/nope/curated", 404, "job_not_found"),
        ("/v1/jobs/{job}/clusters/99999/members", 404, "cluster_not_found"),
        ("/v1/jobs/{job}/clusters/x/members", 422, "validation_failed"),
        ("/v1/jobs/{job}/clusters?sort=colour", 422, "validation_failed"),
        ("/v1/jobs/{job}/clusters?cursor=bm9wZQ", 422, "cursor_invalid"),
        ("/v1/jobs/{job}/clusters?limit=501", 422, "validation_failed"),
        ("/v1/jobs/{job}/seeds/demo/{zero}/neighbours", 404, "seed_not_found"),
        ("/v1/jobs/{job}/seeds/other/{zero}/neighbours", 404, "seed_not_found"),
        ("/v1/jobs/{job}/images/{zero}/provenance", 404, "image_not_found"),
        ("/v1/jobs/{job}/dedup/groups?reason=blurry", 422, "validation_failed"),
    ],
)
def test_bad_requests(client, job, path, status, code):
    response = client.get(path.format(job=job, zero="0" * 64))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
