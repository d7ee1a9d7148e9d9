"""Shards of generated images for the tests that read curated data."""

from pathlib import Path

import pyarrow as pa

from curate.core.shards import shard_name, write_shard
from schemas.shards import CURATED
from tests.images import jpeg


def write_curated_shards(folder: Path, shards: int, per_shard: int, bad: int = 0) -> None:
    """Curated-schema shards of generated photos; the first `bad` rows hold broken bytes."""
    index = 0
    for part in range(shards):
        rows = []
        for _ in range(per_shard):
            data = b"not an image" if index < bad else jpeg(72, 56, seed=index)
            rows.append(
                {
                    "image": {"bytes": data, "path": f"img{index}.jpg"},
                    "image_id": f"{index:064x}",
                    "uri": f"test://{index}",
                    "method": "as-is",
                    "matches": 1,
                    "width": 72,
                    "height": 56,
                }
            )
            index += 1
        write_shard(pa.Table.from_pylist(rows, schema=CURATED), folder / shard_name(part))
