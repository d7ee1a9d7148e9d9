"""pipelines.executor: any stage through one executor on a real local Ray: parts committed once,
resumed, a stateful pool with a load step, and failures that name the part and keep the kind of
the worker's error."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.catalog import Catalog
from curate.core.shards import PartResult, shard_name, write_shard
from curate.core.stage import JobRun, Plan, Resources, Stage, Worker
from pipelines.executor import RayCompute, run_stage
from pipelines.failures import StageFailed, Unschedulable
from schemas.errors import DataError, ErrorKind, ModelError
from schemas.job import parse_job_spec

JOB = "exec"


@dataclass(frozen=True)
class Piece:
    index: int
    rows: int


def _write(out_dir: Path, part: int, values: list[int]) -> PartResult:
    info = write_shard(
        pa.table({"value": pa.array(values, pa.int64())}), out_dir / shard_name(part)
    )
    return PartResult(part, len(values), len(values), {"data": info})


def _total(values: list[int]) -> int:
    return sum(values)


class Squares(Stage):
    """A stateless stage: part i holds the squares of its rows, offset by prepare's result."""

    name = "squares"

    def plan(self, job: JobRun) -> Plan:
        pieces = [Piece(i, i + 1) for i in range(5)]
        return Plan(parts=pieces, total=len(pieces), inputs=job.stage_dir(self.name))

    def prepare(self, job: JobRun, plan: Plan) -> None:
        offset = job.compute.task(self.name, _total, [1, 2, 3])
        plan.inputs = (plan.inputs, offset)
        plan.metrics = {"offset": offset}

    def run_part(self, state: tuple[Path, int], part: Piece) -> PartResult:
        out_dir, offset = state
        if part.rows == 99:
            raise DataError(f"piece {part.index} is unreadable")
        return _write(out_dir, part.index, [offset + r * r for r in range(part.rows)])


class Doubler(Stage):
    """A stateful stage with a load step: workers set up once, parts are loaded in tasks."""

    name = "doubler"
    resources = Resources(cpus=1, gpus=1, stateful=True)
    loads_parts = True

    def plan(self, job: JobRun) -> Plan:
        pieces = [Piece(i, 3) for i in range(4)]
        return Plan(parts=pieces, total=4, inputs={"out": job.stage_dir(self.name), "factor": 2})

    def setup(self, inputs: dict, worker: Worker) -> dict:
        if inputs["factor"] is None:
            raise ModelError("no factor to load")
        return {**inputs, "worker_cpus": worker.cpus}

    def load_part(self, inputs: dict, part: Piece) -> tuple[int, list[int]]:
        return part.index, list(range(part.rows))

    def run_part(self, state: dict, loaded: tuple[int, list[int]]) -> PartResult:
        index, values = loaded
        assert state["worker_cpus"] >= 1
        return _write(state["out"], index, [v * state["factor"] for v in values])

    def describe_setup(self, inputs: Any) -> str:
        return "loading the factor"


def _job(tmp_path: Path) -> JobRun:
    from curate.settings import Settings

    settings = Settings(data_root=tmp_path / "data", progress=False)
    catalog = Catalog(settings.catalog_file, settings.data_root)
    spec = parse_job_spec({"source": "/nowhere", "job_id": JOB})
    catalog.open_job(spec)
    return JobRun(spec, settings, catalog, RayCompute(progress=False))


def _values(job: JobRun, stage: str) -> list[int]:
    return [v for path in job.shard_paths(stage) for v in pq.read_table(path)["value"].to_pylist()]


def test_a_stateless_stage_commits_every_part_once_and_resumes(ray_local, tmp_path):
    job = _job(tmp_path)
    # Part 2 committed by an earlier run: its shard stands and it is not run again.
    first = _write(job.stage_dir("squares"), 2, [-1])
    job.catalog.commit_part(JOB, "squares", first)
    run_stage(Squares(), job)
    assert job.catalog.committed_parts(JOB, "squares") == set(range(5))
    assert _values(job, "squares") == [6, 6, 7, -1, 6, 7, 10, 15, 6, 7, 10, 15, 22]
    (record,) = [s for s in job.catalog.job_report(JOB)["stages"] if s["stage"] == "squares"]
    assert record["status"] == "done" and record["metrics"] == {"offset": 6}
    # Done: a re-run plans nothing and writes nothing.
    before = {p: p.stat().st_mtime_ns for p in job.shard_paths("squares")}
    run_stage(Squares(), job)
    assert {p: p.stat().st_mtime_ns for p in job.shard_paths("squares")} == before


def test_a_stateful_stage_runs_its_parts_through_loaded_workers(ray_local, tmp_path):
    job = _job(tmp_path)
    run_stage(Doubler(), job)
    assert job.catalog.committed_parts(JOB, "doubler") == set(range(4))
    assert _values(job, "doubler") == [0, 2, 4] * 4


class BrokenPiece(Squares):
    name = "broken"

    def plan(self, job: JobRun) -> Plan:
        return Plan(parts=[Piece(0, 1), Piece(1, 99)], total=2, inputs=job.stage_dir(self.name))


class NoFactor(Doubler):
    name = "nofactor"

    def plan(self, job: JobRun) -> Plan:
        plan = super().plan(job)
        plan.inputs["factor"] = None
        return plan


def test_failures_name_the_part_or_the_set_up_and_keep_the_kind(ray_local, tmp_path):
    job = _job(tmp_path)
    with pytest.raises(StageFailed, match="broken failed on part 1: DataError: piece 1") as fail:
        run_stage(BrokenPiece(), job)
    assert fail.value.kind == ErrorKind.DATA and fail.value.code == DataError.code
    (record,) = [s for s in job.catalog.job_report(JOB)["stages"] if s["stage"] == "broken"]
    assert record["status"] == "failed" and "piece 1 is unreadable" in record["message"]

    with pytest.raises(StageFailed, match="nofactor: loading the factor: ModelError") as fail:
        run_stage(NoFactor(), job)
    assert fail.value.kind == ErrorKind.MODEL


class Greedy(Squares):
    """Parts that ask for more cores than any node of the cluster has."""

    name = "greedy"
    resources = Resources(cpus=64)


def test_a_stage_no_node_can_run_fails_at_once_naming_what_it_asks(ray_local, tmp_path):
    job = _job(tmp_path)
    with pytest.raises(Unschedulable, match="greedy: no live node of the Ray cluster has CPU 64"):
        run_stage(Greedy(), job)
    (record,) = [s for s in job.catalog.job_report(JOB)["stages"] if s["stage"] == "greedy"]
    assert record["status"] == "failed" and "live nodes:" in record["message"]


def test_every_committed_part_names_the_node_that_ran_it(ray_local, tmp_path):
    job = _job(tmp_path)
    run_stage(Doubler(), job)
    run_stage(Squares(), job)
    with job.catalog._transaction() as con:
        nodes = con.execute("SELECT DISTINCT node FROM parts WHERE job_id = ?", [JOB]).fetchall()
    assert nodes == [(ray_local.get_runtime_context().get_node_id(),)]
