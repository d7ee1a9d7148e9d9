"""The `curate` command as a user runs it: a real process, real exit codes and messages."""

import json
import os
import subprocess

from tests.cli import run_curate
from tests.corpus import write_folder


def curate(*args: str, data_root, check_code: int | None = 0) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "CURATE_DATA_ROOT": str(data_root),
        "CURATE_NUM_CPUS": "1",
        "CURATE_PROGRESS": "0",
    }
    return run_curate(*args, env=env, code=check_code, timeout=300)


def test_run_list_show_and_sql(tmp_path):
    write_folder(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"<html>")
    data = tmp_path / "data"
    run = curate(
        "run",
        "--source",
        str(tmp_path / "imgs"),
        "--job",
        "cli",
        "--until",
        "ingest",
        data_root=data,
    )
    assert "status: done" in run.stdout and "not_an_image 1" in run.stdout

    listing = curate("jobs", "list", data_root=data).stdout
    assert "cli" in listing and "done" in listing
    shown = json.loads(curate("jobs", "show", "cli", "--json", data_root=data).stdout)
    (stage,) = shown["stages"]
    assert stage["rows_out"] == 5 and stage["errors_by_reason"] == {"not_an_image": 1}
    sql = curate("sql", 'SELECT count(*) AS n FROM "cli".ingest', "--json", data_root=data)
    assert json.loads(sql.stdout) == [{"n": 5}]


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path):
    data = tmp_path / "data"
    missing = curate("run", "--source", str(tmp_path / "nope"), data_root=data, check_code=2)
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    write_folder(tmp_path / "imgs", 1)
    bad = curate(
        "run", "--source", str(tmp_path / "imgs"), "--min-side", "0", data_root=data, check_code=2
    )
    assert "ingest.min_side" in bad.stderr and "Traceback" not in bad.stderr
    bad_id = curate(
        "run",
        "--source",
        str(tmp_path / "imgs"),
        "--job",
        "No Spaces",
        data_root=data,
        check_code=2,
    )
    assert "job_id" in bad_id.stderr
    unknown = curate("jobs", "show", "ghost", data_root=data, check_code=2)
    assert "no job 'ghost'" in unknown.stderr
    query = curate("sql", "SELECT * FROM nowhere", data_root=data, check_code=2)
    assert "query failed" in query.stderr


def test_eval_sets_are_registered_and_checked(tmp_path):
    data = tmp_path / "data"
    write_folder(tmp_path / "bench", 2)
    write_folder(tmp_path / "imgs", 3)
    added = curate("eval-sets", "add", "bench", str(tmp_path / "bench"), data_root=data)
    assert "2 image files" in added.stdout
    assert "bench" in curate("eval-sets", "list", data_root=data).stdout
    missing = curate(
        "eval-sets", "add", "gone", str(tmp_path / "nope"), data_root=data, check_code=2
    )
    assert "does not exist" in missing.stderr
    clash = curate(
        "eval-sets", "add", "bench", str(tmp_path / "imgs"), data_root=data, check_code=2
    )
    assert "registered at" in clash.stderr
    source = ["run", "--source", str(tmp_path / "imgs")]
    unknown = curate(*source, "--eval-sets", "ghost", data_root=data, check_code=2)
    assert "curate eval-sets add ghost" in unknown.stderr
    unweighted = curate(*source, "--eval-sets", "bench", data_root=data, check_code=2)
    assert "CURATE_COPY_WEIGHTS" in unweighted.stderr and "Traceback" not in unweighted.stderr


def test_seeds_cli(tmp_path):
    data = tmp_path / "data"
    write_folder(tmp_path / "seeds", 2)
    added = curate(
        "seeds", "add", "in22k-copy", str(tmp_path / "seeds"), "--policy", "knn:4", data_root=data
    )
    assert "policy knn:4" in added.stdout
    preset = curate("seeds", "add", "imagenet1k", str(tmp_path / "seeds"), data_root=data)
    assert "policy knn:32" in preset.stdout
    rows = {
        r["name"]: r for r in json.loads(curate("seeds", "list", "--json", data_root=data).stdout)
    }
    assert rows["in22k-copy"]["policy"] == "knn:4" and rows["imagenet1k"]["preset"]
    assert rows["imagenet22k"]["location"] is None  # a preset nobody registered yet
    shown = json.loads(curate("seeds", "show", "imagenet1k", "--json", data_root=data).stdout)
    assert shown["location"] == str(tmp_path / "seeds")

    missing = curate(
        "seeds",
        "add",
        "x",
        str(tmp_path / "nope"),
        "--policy",
        "knn:1",
        data_root=data,
        check_code=2,
    )
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    bad = curate(
        "seeds",
        "add",
        "x",
        str(tmp_path / "seeds"),
        "--policy",
        "knn",
        data_root=data,
        check_code=2,
    )
    assert "needs a positive K" in bad.stderr
    unregistered = curate(
        "run",
        "--source",
        str(tmp_path / "seeds"),
        "--seeds",
        "imagenet22k",
        data_root=data,
        check_code=2,
    )
    assert "curate seeds add imagenet22k" in unregistered.stderr
    assert "Traceback" not in unregistered.stderr
