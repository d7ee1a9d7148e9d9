"""The multi-node Ray cluster (tests/cluster.py), started once for the tests of this folder."""

from tests.cluster import ray_cluster  # noqa: F401
