"""Reading EMBED shards into unit vectors."""

import numpy as np
import pyarrow as pa
import pytest

from curate.core.shards import write_shard
from curate.core.vectors import EmbeddingTable, read_embeddings, unit_rows
from schemas.shards import EMBED


def embed_table(ids: list[str], vectors: np.ndarray, part: int = 0) -> pa.Table:
    return pa.table(
        {
            "image_id": ids,
            "part": pa.array([part] * len(ids), pa.int32()),
            "item": pa.array(np.arange(len(ids)), pa.int32()),
            "embedding": pa.array(list(vectors.astype(np.float16)), pa.list_(pa.float16())),
        },
        schema=EMBED,
    )


def test_read_embeddings_streams_and_samples_deterministically(tmp_path):
    rng = np.random.default_rng(9)
    vectors = rng.standard_normal((3700, 12)).astype(np.float32)
    ids = [f"img{i:05d}" for i in range(len(vectors))]
    paths = [tmp_path / "part-0.parquet", tmp_path / "part-1.parquet"]
    write_shard(embed_table(ids[:2500], vectors[:2500], part=0), paths[0])  # 3 row groups
    write_shard(embed_table(ids[2500:], vectors[2500:], part=1), paths[1])

    table = read_embeddings(paths)
    assert isinstance(table, EmbeddingTable) and len(table) == 3700
    assert table.image_ids.to_pylist() == ids
    assert table.parts.tolist() == [0] * 2500 + [1] * 1200 and table.items[2500] == 0
    expected = unit_rows(vectors.astype(np.float16))
    np.testing.assert_allclose(table.vectors, expected, atol=1e-6)

    sample = read_embeddings(paths, sample=500, seed=1)
    picked = [int(i[3:]) for i in sample.image_ids.to_pylist()]
    assert len(set(picked)) == 500 and picked == sorted(picked)
    np.testing.assert_allclose(sample.vectors, expected[picked], atol=1e-6)
    assert sample.image_ids.equals(read_embeddings(paths, sample=500, seed=1).image_ids)
    assert not sample.image_ids.equals(read_embeddings(paths, sample=500, seed=2).image_ids)
    # a uniform sample: both files contribute in proportion
    assert 250 < sum(p < 2500 for p in picked) < 420
    assert len(read_embeddings(paths, sample=10_000)) == 3700


def test_read_embeddings_names_what_is_wrong(tmp_path):
    rng = np.random.default_rng(10)
    good = tmp_path / "good.parquet"
    write_shard(embed_table(["a", "b"], rng.standard_normal((2, 8))), good)
    wider = tmp_path / "wider.parquet"
    write_shard(embed_table(["c"], rng.standard_normal((1, 16))), wider)
    with pytest.raises(ValueError, match=r"wider.parquet: embeddings of dimension 16, earlier .*8"):
        read_embeddings([good, wider])
    other = tmp_path / "other.parquet"
    write_shard(pa.table({"image_id": ["a"]}), other)
    with pytest.raises(ValueError, match="other.parquet is not an embed shard: no column part"):
        read_embeddings([other])
    zero = tmp_path / "zero.parquet"
    write_shard(embed_table(["z"], np.zeros((1, 8))), zero)
    with pytest.raises(ValueError, match="zero.parquet: 1 of 1 rows have no direction"):
        read_embeddings([zero])
    with pytest.raises(ValueError, match="no embed shards"):
        read_embeddings([])
