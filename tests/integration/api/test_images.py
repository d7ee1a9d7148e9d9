"""Original bytes and thumbnails over HTTP, and a job submitted over HTTP that cannot read past
a symlink out of its folder."""

import hashlib
import io

import pytest
from PIL import Image

from curate.browse.thumbs import thumbnail_path
from tests.images import jpeg
from tests.service import run_to_end


@pytest.fixture(scope="module")
def images(client, demo_job) -> list[str]:
    """Image ids of the demo job: the members of its largest cluster."""
    job = demo_job["job_id"]
    largest = client.get(f"/v1/jobs/{job}/clusters", params={"limit": 1}).json()["items"][0]
    members = client.get(
        f"/v1/jobs/{job}/clusters/{largest['cluster_id']}/members", params={"limit": 500}
    ).json()["items"]
    return [m["image_id"] for m in members]


def test_original_bytes_are_the_image(client, demo_job, images):
    for image_id in images[:5]:
        for params in ({}, {"job": demo_job["job_id"]}):
            response = client.get(f"/v1/images/{image_id}", params=params)
            assert response.status_code == 200, response.text
            assert hashlib.sha256(response.content).hexdigest() == image_id
            assert response.headers["content-type"].startswith("image/")
            kind = Image.open(io.BytesIO(response.content)).format
            assert response.headers["content-type"] == Image.MIME[kind]


def test_thumbnails_decode_and_are_cached(client, api_server, images):
    image_id = images[0]
    path = thumbnail_path(api_server.app.state.thumb_dir, image_id)
    path.unlink(missing_ok=True)
    first = client.get(f"/v1/images/{image_id}/thumb")
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/jpeg"
    assert first.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert first.headers["etag"] == f'"{image_id}"'
    with Image.open(io.BytesIO(first.content)) as thumb:
        thumb.load()
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
    assert path.read_bytes() == first.content  # made once, kept on disk
    made = path.stat().st_mtime_ns
    again = client.get(f"/v1/images/{image_id}/thumb")
    assert again.content == first.content and path.stat().st_mtime_ns == made
    for header in (f'"{image_id}"', f'W/"{image_id}"', f'"other", "{image_id}"', "*"):
        cached = client.get(f"/v1/images/{image_id}/thumb", headers={"If-None-Match": header})
        assert cached.status_code == 304 and cached.content == b""
        assert cached.headers["etag"] == f'"{image_id}"'
    stale = client.get(f"/v1/images/{image_id}/thumb", headers={"If-None-Match": '"other"'})
    assert stale.status_code == 200


def test_every_thumbnail_of_a_cluster_loads(client, images):
    for image_id in images:
        response = client.get(f"/v1/images/{image_id}/thumb")
        assert response.status_code == 200, response.text
        with Image.open(io.BytesIO(response.content)) as thumb:
            thumb.load()
            assert max(thumb.size) <= 256


@pytest.mark.parametrize("suffix", ["", "/thumb"])
@pytest.mark.parametrize("image_id", ["0" * 64, "not-an-image-id", "A" * 64])
def test_unknown_images_are_404(client, image_id, suffix):
    response = client.get(f"/v1/images/{image_id}{suffix}")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "image_not_found"


def test_an_image_of_another_job_is_not_found_in_this_one(client, images):
    response = client.get(f"/v1/images/{images[0]}", params={"job": "nope"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def test_a_symlink_out_of_the_source_folder_is_an_error_row_never_an_image(client, api_server):
    folder = api_server.sources / "linked"
    folder.mkdir()
    for seed in range(3):
        (folder / f"photo{seed}.jpg").write_bytes(jpeg(96, 80, seed=seed))
    (folder / "passwd.jpg").symlink_to("/etc/passwd")
    body = {"job_id": "linked", "source": str(folder), "until": "ingest", "recipe": "demo"}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    assert run_to_end(client, "linked")[-1].data["status"] == "done"
    errors = client.get("/v1/jobs/linked/errors", params={"stage": "ingest"}).json()["items"]
    assert [(e["reason"], e["uri"]) for e in errors] == [
        ("outside_root", str(folder / "passwd.jpg"))
    ]
    passwd = hashlib.sha256(open("/etc/passwd", "rb").read()).hexdigest()
    assert client.get(f"/v1/images/{passwd}", params={"job": "linked"}).status_code == 404
    assert client.get(f"/v1/images/{passwd}").status_code == 404
    # The job's photos are served, and it has no clusters to browse.
    photo = hashlib.sha256(jpeg(96, 80, seed=1)).hexdigest()
    assert client.get(f"/v1/images/{photo}", params={"job": "linked"}).status_code == 200
    missing = client.get("/v1/jobs/linked/clusters")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "results_not_found"
