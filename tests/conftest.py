import os
from pathlib import Path

import pytest

from curate.settings import Settings

# The tests' crawler talks to servers on 127.0.0.1 only.
os.environ.setdefault("CURATE_ALLOW_PRIVATE_NETWORKS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


_INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """tests/integration/ (real Ray, HTTP servers, subprocesses, SIGKILL) carries the
    `integration` marker: `make test-fast` leaves those out, `make test` runs everything."""
    for item in items:
        if _INTEGRATION in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the whole session (starting one costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_root=tmp_path / "data", progress=False, allow_private_networks=True)
