"""Sources of every kind, written by the tests from images they generate."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.shards import IMAGE_STRUCT
from tests.images import jpeg


def write_folder(root: Path, count: int, start_seed: int = 0) -> list[Path]:
    """`count` distinct JPEGs spread over two nested folders."""
    paths = []
    for i in range(count):
        path = root / f"sub{i % 2}" / "deeper" / f"img{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(96 + i % 50, 96, seed=start_seed + i))
        paths.append(path)
    return paths


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset shard: each sample is a key and its members by extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def webdataset_samples(count: int, start_seed: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (
            f"shard/{i:05d}",
            {
                "jpg": jpeg(100, 100, seed=start_seed + i),
                "txt": f"caption {i}".encode(),
                "json": json.dumps({"license": "cc-by", "n": i}).encode(),
            },
        )
        for i in range(count)
    ]


def write_hf_parquet(path: Path, images: list[bytes], row_group_size: int = 4) -> Path:
    """Parquet with the Hugging Face image struct, as `datasets` writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": data, "path": f"im{i}.jpg"} for i, data in enumerate(images)],
                type=IMAGE_STRUCT,
            ),
            "label": list(range(len(images))),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_img2dataset_parquet(path: Path, images: list[bytes | None]) -> Path:
    """img2dataset's parquet output: a `jpg` bytes column beside url, caption and status."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "url": [f"http://example.invalid/{i}.jpg" for i in range(len(images))],
            "caption": [f"a photo {i}" for i in range(len(images))],
            "status": ["success" if d is not None else "failed_to_download" for d in images],
            "jpg": pa.array(images, type=pa.binary()),
        }
    )
    pq.write_table(table, path)
    return path
