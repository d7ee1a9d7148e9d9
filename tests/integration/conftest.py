"""Fixtures of the integration tests: the service's (tests/service.py) registered once for the API
and the UI tests, so that one session starts one server and runs one demo job; the S3-compatible
server's (tests/object_store.py)."""

from tests.object_store import object_store, s3_server  # noqa: F401
from tests.service import (  # noqa: F401
    api_server,
    client,
    demo_corpus,
    demo_job,
    read_token,
    write_token,
)
