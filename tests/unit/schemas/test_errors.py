"""schemas.errors: one root, a kind and a stable code on every error the library raises."""

import pytest

from curate.catalog import CatalogError, JobConflict, JobNotFound, NameTaken
from curate.stages.dedup.copy_detection import CopyWeightsError
from curate.stages.dedup.eval_sets import EvalSetError
from curate.stages.embed.model import WeightsError
from curate.stages.ingest.sources import SourceError
from curate.stages.retrieve.seed_sets import SeedSetConflict, SeedSetError
from pipelines.recipes import RecipeError
from schemas.errors import CurateError, ErrorKind
from schemas.job import SpecError
from schemas.train import TrainConfigError

KINDS = {
    SpecError: ErrorKind.INPUT,
    RecipeError: ErrorKind.INPUT,
    TrainConfigError: ErrorKind.INPUT,
    SourceError: ErrorKind.INPUT,
    SeedSetError: ErrorKind.INPUT,
    EvalSetError: ErrorKind.INPUT,
    JobNotFound: ErrorKind.NOT_FOUND,
    WeightsError: ErrorKind.MODEL,
    CopyWeightsError: ErrorKind.MODEL,
    JobConflict: ErrorKind.CONFLICT,
    NameTaken: ErrorKind.CONFLICT,
    SeedSetConflict: ErrorKind.CONFLICT,
    CatalogError: ErrorKind.INTERNAL,
}


@pytest.mark.parametrize("error", KINDS, ids=lambda e: e.__name__)
def test_every_error_has_one_root_a_kind_and_its_own_code(error):
    instance = error("what went wrong")
    assert isinstance(instance, CurateError)
    assert instance.kind == KINDS[error]
    assert instance.to_dict() == {
        "kind": str(KINDS[error]),
        "code": error.code,
        "message": "what went wrong",
    }


def test_codes_are_distinct_and_builtin_bases_kept():
    codes = [error.code for error in KINDS]
    assert len(codes) == len(set(codes))
    # Callers that caught the builtin classes before the common root still do.
    assert issubclass(SpecError, ValueError) and issubclass(CatalogError, RuntimeError)
    assert issubclass(SeedSetConflict, SeedSetError)


def test_an_instance_can_carry_the_kind_and_code_of_what_failed_elsewhere():
    carried = CurateError("part 3 failed", kind=ErrorKind.DATA, code="source_invalid")
    assert (carried.kind, carried.code) == (ErrorKind.DATA, "source_invalid")
    assert CurateError("x").kind == ErrorKind.INTERNAL
