"""Image bytes found through the location index, one value read out of a Parquet page, and
thumbnails made once."""

import hashlib
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.browse import thumbs
from curate.browse.errors import ImageNotFound
from curate.browse.pages import BinaryColumnReader, Unsupported
from curate.browse.store import Browser, Location, _read_row
from curate.core.shards import PartResult, ShardInfo, shard_name, write_shard
from schemas.errors import DataError
from schemas.job import parse_job_spec
from tests.images import encode, jpeg, photo
from tests.unit.browse.conftest import ingest_rows


@pytest.fixture(scope="module")
def browser(tiny, tmp_path_factory):
    return Browser(tiny.settings, tiny.catalog, thumb_dir=tmp_path_factory.mktemp("thumbs"))


def test_every_image_is_located_at_its_first_occurrence(tiny, browser):
    a = browser.locate(tiny.id("A"), "tiny")
    # A's first occurrence is item 1 of part 0; item 3 repeats it with null bytes.
    assert (a.path.name, a.row, a.source) == ("part-000000.parquet", 1, "crawl")
    c = browser.locate(tiny.id("C"))  # no job given: the job that holds it
    assert (c.path.name, c.row, c.job_id) == ("part-000000.parquet", 2, "tiny")
    # Seed images live in the seed set's ingest shards; S0 (a seed's bytes) is in the crawl.
    s1 = browser.locate(tiny.id("s1"), "tiny")
    assert s1.source == "pets" and s1.row == 1 and "seed_sets" in str(s1.path)
    assert browser.locate(tiny.id("s0")).source == "crawl"


@pytest.mark.parametrize("name", ["A", "C", "P", "L", "G", "s1", "s2", "E", "D"])
def test_original_bytes_are_exact(tiny, browser, name):
    data, media_type = browser.image(tiny.id(name), "tiny")
    assert data == tiny.data[name]
    assert media_type == ("image/png" if name == "P" else "image/jpeg")


def test_unknown_images_are_not_found(tiny, browser):
    for image_id in ("0" * 64, "not-an-id", tiny.id("A").upper()):
        with pytest.raises(ImageNotFound):
            browser.image(image_id)
    with pytest.raises(ImageNotFound):
        browser.thumbnail("0" * 64)


def test_thumbnails_fit_256_px_and_are_made_once(tiny, browser):
    path = browser.thumbnail(tiny.id("L"))
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.size == (256, 192)
    made = path.stat().st_mtime_ns
    assert browser.thumbnail(tiny.id("L")) == path and path.stat().st_mtime_ns == made
    with Image.open(browser.thumbnail(tiny.id("P"))) as small:
        assert small.size == (70, 50)  # never enlarged


def test_thumbnails_flatten_transparency_and_apply_exif_orientation():
    rgba = Image.new("RGBA", (300, 100), (255, 0, 0, 0))
    with Image.open(io.BytesIO(thumbs.make_thumbnail(encode(rgba, "PNG")))) as out:
        assert out.mode == "RGB" and out.size == (256, 85)
        assert out.getpixel((10, 10)) == (255, 255, 255)  # transparent -> white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored landscape, shown portrait
    landscape = encode(photo(320, 160, seed=1), "JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(thumbs.make_thumbnail(landscape))) as out:
        assert out.size == (128, 256)


def test_a_damaged_shard_is_a_data_error(fresh_tiny, tmp_path):
    browser = Browser(fresh_tiny.settings, fresh_tiny.catalog, thumb_dir=tmp_path / "t")
    location = browser.locate(fresh_tiny.id("F"), "tiny")
    with open(location.path, "r+b") as handle:
        handle.truncate(os.path.getsize(location.path) // 2)
    with pytest.raises(DataError, match="missing or damaged"):
        browser.image(fresh_tiny.id("F"), "tiny")


def _values(n: int) -> list[bytes | None]:
    return [None if i % 3 == 1 else (b"v%d-" % i) * (i % 40 + 1) for i in range(n)]


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("page_size", [300, 1 << 20])
def test_one_value_is_read_out_of_its_page(tmp_path, version, page_size):
    values = _values(2500)
    table = pa.table(
        {"image": pa.array([{"bytes": v, "path": "p"} for v in values]), "k": range(2500)}
    )
    path = tmp_path / "t.parquet"
    pq.write_table(
        table,
        path,
        row_group_size=700,
        data_page_size=page_size,
        data_page_version=version,
        compression="none",
        use_dictionary=False,
    )
    reader = BinaryColumnReader("image.bytes")
    for row in list(range(0, 2500, 7)) + [699, 700, 2499]:
        assert reader.read(path, row) == values[row]
    with pytest.raises(IndexError):
        reader.read(path, 2500)


def test_compressed_or_dictionary_columns_are_unsupported_and_fall_back(tmp_path, tiny):
    data = [jpeg(40, 40, seed=i) for i in range(5)]
    path = tmp_path / "z.parquet"
    pq.write_table(pa.table({"image": [{"bytes": d, "path": "p"} for d in data]}), path)
    with pytest.raises(Unsupported):
        BinaryColumnReader("image.bytes").read(path, 2)
    # The store reads such a shard the ordinary way, and still checks the bytes against the id.
    assert _read_row(path, 3) == data[3]
    browser = Browser(tiny.settings, tiny.catalog, thumb_dir=tmp_path / "t")
    location = Location("x", hashlib.sha256(data[4]).hexdigest(), path, 4, "JPEG", "u", "crawl")
    assert browser.original(location) == data[4]


def test_a_running_job_adds_location_indexes_without_rebuilding(fresh_tiny, tmp_path):
    browser = Browser(
        fresh_tiny.settings, fresh_tiny.catalog, tmp_path / "t", recheck_s=0.0, settled_s=0.0
    )
    assert browser.locate(fresh_tiny.id("A")).row == 1
    folder = fresh_tiny.job_dir / "browse" / "locations"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(before) == 3  # two crawl parts and the seed set's shard
    new = jpeg(90, 70, seed=99)
    image_id = hashlib.sha256(new).hexdigest()
    data, ids = {"N": new}, {"N": image_id}
    info = write_shard(
        ingest_rows(["N"], 2, data, ids), fresh_tiny.job_dir / "ingest" / shard_name(2)
    )
    fresh_tiny.catalog.commit_part("tiny", "ingest", PartResult(2, 1, 1, {"data": info}))
    assert browser.image(image_id)[0] == new
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(after) == 4 and all(after[name] == made for name, made in before.items())


def test_a_job_with_an_unreadable_shard_hides_no_other_job(fresh_tiny, tmp_path):
    from curate.core.shards import PartResult

    catalog = fresh_tiny.catalog
    catalog.open_job(parse_job_spec({"job_id": "broken", "source": "/x"}))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    catalog.commit_part(
        "broken", "ingest", PartResult(0, 1, 1, {"data": ShardInfo(bad, 1, 11, "0")})
    )
    browser = Browser(fresh_tiny.settings, catalog, tmp_path / "t")
    assert browser.image(fresh_tiny.id("G"))[0] == fresh_tiny.data["G"]
    with pytest.raises(DataError, match="cannot be read"):
        browser.image(fresh_tiny.id("G"), "broken")
