"""WebDataset export of curated shards: read back with `webdataset`, bytes and provenance kept."""

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pytest

from curate.core.shards import write_shard
from curate.stages.curated.shuffle import curated_schema
from curate.stages.curated.webdataset import export_webdataset, image_extension
from tests.images import encode, jpeg, photo


def curated_shard(path: Path, images: list[bytes], start: int = 0) -> list[dict]:
    rows = []
    for n, data in enumerate(images, start):
        image_id = hashlib.sha256(data).hexdigest()
        rows.append(
            {
                "image": {"bytes": data, "path": f"{image_id}.img"},
                "image_id": image_id,
                "uri": f"http://crawl/{n}",
                "seed_set": "alpha" if n % 2 else "beta",
                "seed_id": None if n % 3 == 0 else f"seed{n}",
                "similarity": 0.5 + n / 100,
                "method": "knn" if n % 3 else "cluster",
                "cluster_id": n if n % 3 == 0 else None,
                "matches": 1 + n % 2,
                "width": 64 + n,
                "height": 48,
            }
        )
    write_shard(pa.Table.from_pylist(rows, schema=curated_schema()), path)
    return rows


def test_image_extension_from_content():
    img = photo(40, 30, seed=1)
    assert image_extension(encode(img, "JPEG")) == "jpg"
    assert image_extension(encode(img, "PNG")) == "png"
    assert image_extension(encode(img, "WEBP")) == "webp"
    assert image_extension(encode(img, "GIF")) == "gif"
    assert image_extension(encode(img, "TIFF")) == "tiff"
    with pytest.raises(ValueError, match="not an image"):
        image_extension(b"hello world")


def test_export_reads_back_with_webdataset(tmp_path):
    import webdataset as wds

    img = photo(50, 40, seed=9)
    first = [jpeg(60, 40, seed=i) for i in range(4)] + [encode(img, "PNG")]
    second = [encode(photo(30, 30, seed=20), "WEBP"), jpeg(70, 50, seed=21)]
    rows = curated_shard(tmp_path / "c" / "part-000000.parquet", first)
    rows += curated_shard(tmp_path / "c" / "part-000001.parquet", second, start=len(first))
    out = tmp_path / "wds"
    out.mkdir()
    (out / "000007.tar").write_bytes(b"left over from a bigger export")
    (out / "notes.txt").write_text("not ours")

    tars = export_webdataset(
        sorted((tmp_path / "c").glob("*.parquet")), out, samples_per_tar=3, progress=False
    )

    assert [t.name for t in tars] == ["000000.tar", "000001.tar", "000002.tar"]
    assert sorted(p.name for p in out.iterdir()) == [t.name for t in tars] + ["notes.txt"]
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r["image_id"] for r in rows]
    for sample, row in zip(samples, rows, strict=True):
        extension = {"jpg", "png", "webp"} & set(sample)
        assert len(extension) == 1
        assert sample[extension.pop()] == row["image"]["bytes"]
        meta = json.loads(sample["json"])
        assert meta["uri"] == row["uri"] and meta["seed_set"] == row["seed_set"]
        assert meta["seed_id"] == row["seed_id"] and meta["cluster_id"] == row["cluster_id"]
        assert meta["similarity"] == pytest.approx(row["similarity"], abs=1e-6)
        assert (meta["width"], meta["height"], meta["matches"]) == (
            row["width"],
            row["height"],
            row["matches"],
        )
    assert "png" in samples[4] and "webp" in samples[5]

    # Re-exporting the same shards gives the same bytes: tars are reproducible.
    before = [t.read_bytes() for t in tars]
    again = export_webdataset(sorted((tmp_path / "c").glob("*.parquet")), out, samples_per_tar=3)
    assert [t.read_bytes() for t in again] == before


def test_export_refuses_rows_without_bytes_and_leaves_no_partial_tar(tmp_path):
    shard = tmp_path / "part-000000.parquet"
    rows = curated_shard(shard, [jpeg(40, 40, seed=1), jpeg(40, 40, seed=2)])
    rows[1]["image"] = {"bytes": None, "path": "x.jpg"}
    write_shard(pa.Table.from_pylist(rows, schema=curated_schema()), shard)
    out = tmp_path / "wds"
    with pytest.raises(ValueError, match=f"image {rows[1]['image_id']} has no bytes"):
        export_webdataset([shard], out)
    assert list(out.iterdir()) == [], "the interrupted tar is not left behind"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_webdataset([tmp_path / "missing.parquet"], out)
