import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.stages.ingest.decode import Rejected
from curate.stages.ingest.items import read_local_items
from curate.stages.ingest.sources import SourceError, detect_source
from schemas.reasons import Reason
from tests.corpus import (
    webdataset_samples,
    write_folder,
    write_hf_parquet,
    write_img2dataset_parquet,
    write_tar,
)
from tests.images import jpeg


def test_folder_is_walked_recursively_in_a_stable_order(tmp_path):
    write_folder(tmp_path / "imgs", 7)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / ".hidden.jpg").write_bytes(b"x")
    source = detect_source(str(tmp_path / "imgs"))
    assert source.kind == "files" and len(source.files) == 7 and source.skipped_files == 1
    parts = list(source.parts(shard_size=3))
    assert [len(p.items) for p in parts] == [3, 3, 1]
    assert source.parts_total(3) == 3
    assert parts == list(detect_source(str(tmp_path / "imgs")).parts(shard_size=3))
    items = list(read_local_items(parts[0]))
    assert all(isinstance(data, bytes) for _, _, data in items)


def test_glob_selects_files(tmp_path):
    write_folder(tmp_path / "imgs", 6)
    source = detect_source(str(tmp_path / "imgs" / "sub0" / "**" / "*.jpg"))
    assert source.kind == "files" and len(source.files) == 3


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".tsv", ".jsonl", ".parquet"])
def test_url_lists_keep_extra_columns_as_metadata(tmp_path, suffix):
    urls = [f"http://127.0.0.1:1/{i}.jpg" for i in range(5)]
    path = tmp_path / f"list{suffix}"
    if suffix == ".txt":
        path.write_text("# a comment\n" + "\n".join(urls) + "\n\n")
    elif suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        lines = [f"url{sep}caption{sep}license"] + [
            f"{u}{sep}cap {i}{sep}cc0" for i, u in enumerate(urls)
        ]
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".jsonl":
        path.write_text(
            "\n".join(json.dumps({"url": u, "caption": f"cap {i}"}) for i, u in enumerate(urls))
        )
    else:
        pq.write_table(pa.table({"url": urls, "caption": [f"cap {i}" for i in range(5)]}), path)
    source = detect_source(str(path))
    assert source.kind == "urls"
    parts = list(source.parts(shard_size=2))
    assert [len(p.items) for p in parts] == [2, 2, 1] and source.parts_total(2) == 3
    assert [url for p in parts for url, _ in p.items] == urls
    first_meta = json.loads(parts[0].items[0][1])
    if suffix != ".txt":
        assert first_meta["caption"] == "cap 0"


def test_webdataset_tar_groups_members_into_samples(tmp_path):
    samples = webdataset_samples(3) + [("shard/caption-only", {"txt": b"no image"})]
    path = write_tar(tmp_path / "wds" / "000.tar", samples)
    source = detect_source(str(tmp_path / "wds" / "*.tar"))
    assert source.kind == "tar"
    (part,) = source.parts(shard_size=1000)
    items = list(read_local_items(part))
    assert len(items) == 4
    uri, metadata, data = items[0]
    assert uri == f"{path}#shard/00000.jpg" and isinstance(data, bytes)
    assert json.loads(metadata) == {
        "key": "shard/00000",
        "license": "cc-by",
        "n": 0,
        "txt": "caption 0",
    }
    assert isinstance(items[3][2], Rejected) and items[3][2].reason == Reason.NOT_AN_IMAGE


def test_truncated_tar_keeps_what_it_could_read(tmp_path):
    path = write_tar(tmp_path / "t.tar", webdataset_samples(4))
    # Cut inside a member: a cut on a header boundary reads as a shorter, valid archive.
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 700])
    (part,) = detect_source(str(path)).parts(1000)
    items = list(read_local_items(part))
    assert any(isinstance(d, bytes) for _, _, d in items)
    assert isinstance(items[-1][2], Rejected) and items[-1][2].reason == Reason.READ_ERROR


def test_parquet_image_shards_both_layouts(tmp_path):
    images = [jpeg(100, 100, seed=i) for i in range(10)]
    hf = write_hf_parquet(tmp_path / "hf" / "a.parquet", images, row_group_size=4)
    source = detect_source(str(hf))
    assert source.kind == "parquet" and source.image_column == "image"
    parts = list(source.parts(shard_size=5))
    assert [p.row_groups for p in parts] == [(0, 1), (2,)]
    items = [item for part in parts for item in read_local_items(part)]
    assert [data for _, _, data in items] == images
    assert items[0][0] == "im0.jpg" and json.loads(items[9][1]) == {"label": 9}

    i2d = write_img2dataset_parquet(tmp_path / "i2d" / "b.parquet", [images[0], None])
    source = detect_source(str(i2d))
    assert source.kind == "parquet" and source.image_column == "jpg"
    items = list(read_local_items(next(source.parts(100))))
    assert items[0][0] == "http://example.invalid/0.jpg"
    assert json.loads(items[0][1])["caption"] == "a photo 0"
    assert isinstance(items[1][2], Rejected) and items[1][2].reason == Reason.EMPTY


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: str(d / "missing"), "does not exist"),
        (lambda d: str(d / "nothing-*.jpg"), "matches nothing"),
        (lambda d: "https://example.invalid/a.jpg", "single URL"),
        (lambda d: (d / "empty").mkdir() or str(d / "empty"), "holds no image"),
        (
            lambda d: (d / "l.csv").write_text("link,caption\nx,y\n") and str(d / "l.csv"),
            "no 'url' column",
        ),
        (
            lambda d: pq.write_table(pa.table({"a": [1]}), d / "p.parquet") or str(d / "p.parquet"),
            "neither an image column",
        ),
        (lambda d: (d / "x.bin").write_bytes(b"1") and str(d / "x.bin"), "mixes file kinds"),
    ],
)
def test_unreadable_sources_are_clear_errors(tmp_path, make, message):
    with pytest.raises(SourceError, match=message):
        detect_source(make(tmp_path))
