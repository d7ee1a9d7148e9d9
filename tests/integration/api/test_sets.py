"""Seed and evaluation sets over HTTP: listed, shown, registered with the CLI's checks and
messages, and confined to the roots the service may read."""

import pytest

from tests.corpus import write_folder
from tests.service import curate_cli


@pytest.fixture(scope="module")
def folder(api_server):
    """A small image folder under the service's source root."""
    path = api_server.sources / "sets"
    write_folder(path, 4)
    return path


def test_seed_sets_list_registered_sets_then_presets(client, demo_job):
    items = client.get("/v1/seed-sets").json()["items"]
    demo = next(s for s in items if s["name"] == "demo")
    assert demo["registered"] and not demo["preset"]
    assert demo["policy"] == "as-is+knn:4+cluster:25+balanced:200"
    assert demo["cache"]["ingested"] and demo["cache"]["images"] > 0  # the demo job used it
    assert len(demo["cache"]["embedded_with"]) == 1
    presets = {s["name"]: s for s in items if s["preset"]}
    assert presets["imagenet1k"]["policy"] == "knn:32" and not presets["imagenet1k"]["registered"]
    shown = client.get("/v1/seed-sets/demo").json()
    assert shown == demo
    assert client.get("/v1/seed-sets/imagenet22k").json()["location"] is None
    missing = client.get("/v1/seed-sets/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "set_not_found"


def test_register_a_seed_set_as_the_cli_does(client, folder):
    body = {"name": "pets", "location": str(folder), "policy": "knn:3", "cap": 100}
    created = client.post("/v1/seed-sets", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["policy"] == "knn:3" and created.json()["cap"] == 100
    assert client.post("/v1/seed-sets", json=body).status_code == 201  # the same again: fine
    changed = client.post("/v1/seed-sets", json={**body, "policy": "knn:5"})
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "name_taken"
    replaced = client.post("/v1/seed-sets", json={**body, "policy": "knn:5", "replace": True})
    assert replaced.status_code == 201 and replaced.json()["policy"] == "knn:5"
    # A preset's name takes the preset's policy.
    preset = client.post("/v1/seed-sets", json={"name": "gldv2", "location": str(folder)})
    assert preset.status_code == 201 and preset.json()["policy"] == "as-is+knn:4"


@pytest.mark.parametrize(
    "body, field, code",
    [
        ({"name": "Bad Name", "policy": "knn:3"}, "body.name", "seed_set_invalid"),
        ({"name": "x1", "policy": "knn:0"}, "body.policy", "seed_set_invalid"),
        ({"name": "x1", "policy": "nearest"}, "body.policy", "seed_set_invalid"),
        ({"name": "x1"}, "body.policy", "seed_set_invalid"),  # not a preset: needs a policy
        ({"name": "x1", "policy": "knn:3", "cap": 0}, "body.cap", "seed_set_invalid"),
        ({"name": "x1", "policy": "knn:3", "location": "/etc"}, "body.location", None),
        ({"name": "x1", "policy": "knn:3", "location": "{root}/../x"}, "body.location", None),
        ({"name": "x1", "policy": "knn:3", "location": "{root}/none"}, "body.location", None),
        ({"name": "x1", "policy": "knn:3", "extra": 1}, "body.extra", "validation_failed"),
    ],
)
def test_bad_seed_sets_name_the_field(client, api_server, folder, body, field, code):
    body = {"location": str(folder), **body}
    body["location"] = body["location"].format(root=api_server.sources)
    response = client.post("/v1/seed-sets", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert code is None or error["code"] == code


def test_messages_are_the_cli_messages(client, api_server, folder):
    response = client.post(
        "/v1/seed-sets", json={"name": "x2", "location": str(folder), "policy": "knn:0"}
    )
    cli = curate_cli(
        "seeds", "add", "x2", str(folder), "--policy", "knn:0",
        data_root=api_server.settings.data_root, check=False,
    )  # fmt: skip
    assert cli.returncode == 2
    assert response.json()["error"]["message"] in cli.stderr


def test_a_symlink_out_of_the_roots_is_refused(client, api_server, tmp_path):
    (api_server.sources / "escape").symlink_to(tmp_path)
    response = client.post(
        "/v1/seed-sets",
        json={"name": "x3", "location": str(api_server.sources / "escape"), "policy": "knn:1"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "location_not_allowed"


def test_eval_sets(client, api_server, folder, read_token):
    created = client.post("/v1/eval-sets", json={"name": "bench", "location": str(folder)})
    assert created.status_code == 201, created.text
    assert created.json() == {"name": "bench", "location": str(folder)}
    assert {"name": "bench", "location": str(folder)} in client.get("/v1/eval-sets").json()["items"]
    elsewhere = client.post(
        "/v1/eval-sets", json={"name": "bench", "location": str(api_server.sources / "demo")}
    )
    assert elsewhere.status_code == 409
    for body, field in (
        ({"name": "Bench", "location": str(folder)}, "body.name"),
        ({"name": "b2", "location": "/etc"}, "body.location"),
        ({"name": "b2", "location": str(folder / "missing")}, "body.location"),
    ):
        response = client.post("/v1/eval-sets", json=body)
        assert response.status_code == 422 and response.json()["error"]["field"] == field
    with api_server.client(read_token) as reader:
        refused = reader.post("/v1/eval-sets", json={"name": "b3", "location": str(folder)})
        assert refused.status_code == 403
        assert reader.get("/v1/eval-sets").status_code == 200
