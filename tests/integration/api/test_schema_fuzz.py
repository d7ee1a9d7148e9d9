"""The whole OpenAPI schema driven with generated requests (schemathesis): no request makes a
server error, and every response fits the schema. On a server of its own (no auth, an empty data
root, no readable sources), so generated DELETEs and cancels touch nothing another test uses."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from curate.settings import Settings
from services.api.app import create_app
from services.api.settings import ServiceSettings
from tests.service import ApiServer, serve


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("fuzz")
    with serve(
        Settings(data_root=root / "data", progress=False), ServiceSettings(port=0, auth=False)
    ) as server:
        yield server


def _schema() -> schemathesis.BaseSchema:
    """The service's own OpenAPI document, as create_app publishes it at /openapi.json."""
    root = Path(tempfile.mkdtemp(prefix="curate-openapi-"))
    try:
        app = create_app(Settings(data_root=root, progress=False), ServiceSettings(auth=False))
        return schemathesis.openapi.from_dict(app.openapi())
    finally:
        shutil.rmtree(root, ignore_errors=True)


schema = _schema()


@schema.parametrize()
# Derandomized: the same requests every run, so CI never finds a new case by chance.
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_generated_request_makes_a_server_error(case, fuzz_server):
    case.call_and_validate(
        base_url=fuzz_server.url, checks=[not_a_server_error, response_schema_conformance]
    )
