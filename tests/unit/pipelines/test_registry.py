"""pipelines.registry: every stage named once, in order, and a job's stages from its spec."""

import pickle

from curate.core.stage import Stage
from pipelines.registry import ENTRIES, all_stages, job_stages
from schemas.job import STAGES as JOB_STAGES
from schemas.job import StageName, parse_job_spec


def test_the_registry_holds_one_stage_object_per_name_in_pipeline_order():
    stages = all_stages()
    assert [stage.name for stage in stages] == list(StageName)
    assert all(isinstance(stage, Stage) for stage in stages)
    # The table's sections (written there so that a job imports only its own stages) are the
    # stage objects' own.
    assert [entry.section for entry in ENTRIES] == [stage.job_section() for stage in stages]
    # Every section a stage belongs to is a stage a job can name, and the sections come in order.
    sections = [stage.job_section() for stage in stages]
    assert list(dict.fromkeys(sections)) == list(JOB_STAGES)
    # Stage objects travel to Ray workers.
    for stage in stages:
        assert type(pickle.loads(pickle.dumps(stage))) is type(stage)


def test_a_job_runs_the_stages_of_its_sections_up_to_its_last_stage():
    names = [s.name for s in job_stages(parse_job_spec({"source": "/x", "until": "dedup"}))]
    assert names == ["ingest", "dedup_features", "dedup"]
    unseeded = [s.name for s in job_stages(parse_job_spec({"source": "/x"}))]
    assert unseeded[-1] == "cluster"
    seeded = [s.name for s in job_stages(parse_job_spec({"source": "/x", "seeds": ["a"]}))]
    assert seeded == list(StageName)
