import pytest
from pydantic import ValidationError

from curate.settings import Settings
from schemas.job import SpecError, parse_job_spec


def test_valid_spec_fills_defaults():
    spec = parse_job_spec({"source": "data/x", "job_id": "demo"})
    assert spec.until is None and spec.stages()[-1] == "cluster"  # no seed sets: no retrieval
    assert spec.ingest.shard_size == 1000 and spec.ingest.min_side == 64
    assert spec.embed.arch == "vit_huge_patch14_224" and spec.cluster.n_clusters is None
    # Unset: the copy model's calibrated points (DINOv2's 0.6 / 0.45 without calibration).
    assert spec.dedup.copy_threshold is None and spec.dedup.eval_threshold is None


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"source": "x", "shard_sise": 10}, "shard_sise: unknown field"),
        ({"source": "x", "ingest": {"min_side": 0}}, "ingest.min_side"),
        ({"source": "x", "ingest": {"colour": "red"}}, "ingest.colour: unknown field"),
        ({"source": "x", "job_id": "Bad Id!"}, "job_id"),
        ({"source": "x", "until": "nowhere"}, "until"),
        ({"source": "x", "until": "curated"}, "needs seed sets"),
        ({"source": "x", "seeds": ["Bad Name"]}, "seeds"),
        ({"source": "x", "dedup": {"copy_background": "Bad Name"}}, "dedup.copy_background"),
        ({"source": "x", "dedup": {"copy_background": "bg"}}, "copy_threshold"),
        ({"source": "x", "embed": {"batch_size": 0}}, "embed.batch_size"),
        ({"source": "   "}, "source"),
        ({}, "source"),
    ],
)
def test_bad_spec_names_the_field(data, named):
    with pytest.raises(SpecError) as caught:
        parse_job_spec(data)
    assert named in str(caught.value)


def test_identity_ignores_job_id_and_until():
    a = parse_job_spec({"source": "x", "job_id": "a"})
    b = parse_job_spec({"source": "x", "job_id": "b"})
    assert a.identity() == b.identity()
    assert a.identity() != parse_job_spec({"source": "y"}).identity()


def test_settings_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CURATE_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("CURATE_CRAWL__TIMEOUT_S", "3.5")
    monkeypatch.setenv("CURATE_ALLOW_PRIVATE_NETWORKS", "0")
    settings = Settings()
    assert settings.catalog_file == tmp_path / "catalog.duckdb"
    assert settings.crawl_settings().timeout_s == 3.5
    assert settings.crawl_settings().allow_private_networks is False
    monkeypatch.setenv("CURATE_CRAWL__RETRIES", "-1")
    with pytest.raises(ValidationError, match="retries"):
        Settings()
