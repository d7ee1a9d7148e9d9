"""Confinement: locations under the allowed roots only, and no symlink followed out of a source."""

import os

import pyarrow.parquet as pq
import pytest

from curate.settings import CrawlSettings
from curate.stages.ingest.confine import LocationNotAllowed, check_location, glob_base
from curate.stages.ingest.items import read_local_items
from curate.stages.ingest.part import ingest_part
from curate.stages.ingest.sources import SourceError, detect_source
from schemas.job import IngestOptions
from schemas.reasons import Reason
from tests.corpus import write_folder, write_tar
from tests.images import jpeg


@pytest.fixture
def roots(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "crawl").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    return allowed


def test_locations_under_a_root_pass(roots):
    assert check_location(str(roots / "crawl"), [roots]) == str(roots / "crawl")
    assert check_location(str(roots / "crawl" / "**" / "*.jpg"), [roots])
    assert check_location(str(roots), [roots])


@pytest.mark.parametrize(
    "location, fragment",
    [
        ("{tmp}/elsewhere", "outside the folders"),
        ("{root}/../elsewhere", "must not contain '..'"),
        ("{root}/crawl/**/../../../x", "must not contain '..'"),
        ("relative/path", "absolute path"),
        ("/etc/passwd", "outside the folders"),
        ("{root}-sibling/x", "outside the folders"),
        ("   ", "is empty"),
        ("{root}/a\x00b", "NUL"),
        ("{root}/" + "x" * 300, "longer than 255"),
    ],
)
def test_locations_outside_the_roots_are_refused(roots, tmp_path, location, fragment):
    location = location.format(tmp=tmp_path, root=roots)
    with pytest.raises(LocationNotAllowed, match=fragment) as caught:
        check_location(location, [roots], field="location")
    assert caught.value.field == "location" and caught.value.code == "location_not_allowed"
    assert caught.value.kind == "input"


def test_a_symlinked_folder_under_a_root_that_leads_out_is_refused(roots, tmp_path):
    (roots / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LocationNotAllowed, match="outside"):
        check_location(str(roots / "link" / "*.jpg"), [roots])


def test_no_roots_means_no_local_path(roots):
    with pytest.raises(LocationNotAllowed, match="CURATE_SOURCE_ROOTS"):
        check_location(str(roots / "crawl"), [])


def test_glob_base_is_the_fixed_part():
    assert glob_base("/data/crawl/**/*.jpg") == "/data/crawl"
    assert glob_base("*.jpg") == "."
    assert glob_base("/data/x.tar") == "/data/x.tar"


def _folder_with_passwd_link(tmp_path):
    folder = tmp_path / "crawl"
    write_folder(folder, 3)
    (folder / "passwd.jpg").symlink_to("/etc/passwd")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg(96, 96, seed=7))
    (folder / "outside.jpg").symlink_to(outside)
    inside = folder / "sub0" / "deeper" / "img0000.jpg"
    (folder / "inside-link.jpg").symlink_to(inside)
    return folder


def test_folder_source_never_follows_a_symlink_out_of_its_folder(tmp_path):
    folder = _folder_with_passwd_link(tmp_path)
    source = detect_source(str(folder))
    (part,) = list(source.parts(shard_size=100))
    items = {uri: data for uri, _, data in read_local_items(part)}
    assert len(items) == 6
    passwd = items[str(folder / "passwd.jpg")]
    assert passwd.reason == Reason.OUTSIDE_ROOT and "/etc/passwd" not in passwd.detail
    assert items[str(folder / "outside.jpg")].reason == Reason.OUTSIDE_ROOT
    # A link that stays inside the folder is read like any file.
    assert isinstance(items[str(folder / "inside-link.jpg")], bytes)
    assert not any(uri.startswith("/etc") for uri in items)


def test_the_ingest_shards_hold_error_rows_with_the_path_as_listed(tmp_path):
    folder = _folder_with_passwd_link(tmp_path)
    (part,) = list(detect_source(str(folder / "*.jpg")).parts(shard_size=100))
    result = ingest_part(part, IngestOptions(min_side=8), CrawlSettings(), tmp_path / "out")
    assert result.error_counts == {Reason.OUTSIDE_ROOT.value: 2}
    errors = pq.read_table(result.shards["errors"].path).to_pylist()
    assert sorted(e["uri"] for e in errors) == [
        str(folder / "outside.jpg"),
        str(folder / "passwd.jpg"),
    ]
    images = pq.read_table(result.shards["data"].path, columns=["uri"]).column(0).to_pylist()
    assert str(folder / "inside-link.jpg") in images and not any("etc" in u for u in images)


def test_roots_widen_or_narrow_the_boundary(tmp_path):
    folder = _folder_with_passwd_link(tmp_path)
    (part,) = list(detect_source(str(folder), roots=[tmp_path]).parts(shard_size=100))
    reasons = {
        os.path.basename(uri): getattr(data, "reason", None)
        for uri, _, data in read_local_items(part)
    }
    # outside.jpg lies under the root: allowed; /etc/passwd is not.
    assert reasons["outside.jpg"] is None and reasons["passwd.jpg"] == Reason.OUTSIDE_ROOT
    (part,) = list(detect_source(str(tmp_path / "outside.jpg"), roots=[folder]).parts(10))
    ((_, _, data),) = list(read_local_items(part))
    assert data.reason == Reason.OUTSIDE_ROOT


def test_a_shard_symlinked_out_of_the_folder_refuses_the_source(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(tmp_path / "real.tar", [("a", {"jpg": jpeg(seed=1)})])
    (folder / "a.tar").symlink_to(tmp_path / "real.tar")
    with pytest.raises(SourceError, match="leads outside the source folder"):
        detect_source(str(folder / "*.tar"))
