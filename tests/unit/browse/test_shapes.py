"""The stored JSON is exactly what the REST response models say: the routers send it without
validating it again, so this is where a drift between the index and the contract shows."""

import pytest

from curate.browse import queries as q
from curate.browse.store import Browser
from schemas.api import Page
from services.api.results import (
    ClusterCard,
    ClusterMap,
    DedupGroup,
    Member,
    Neighbours,
    Provenance,
)


@pytest.fixture(scope="module")
def browse(tiny):
    browser = Browser(tiny.settings, tiny.catalog)
    return browser.results("tiny"), browser.cursor()


def _same(model, value) -> None:
    # Validated and dumped again, the value comes back unchanged: no field missing, none extra,
    # no type the model would coerce.
    assert model.model_validate(value).model_dump(mode="json") == value


def test_every_stored_shape_is_the_contract(tiny, browse):
    index, db = browse
    for sort in ("size", "seed_coverage"):
        _same(Page[ClusterCard], q.clusters(index, sort, 2, None).body.value)
    for cluster in range(3):
        _same(Page[Member], q.members(index, cluster, 2, None).body.value)
    for seed in ("s0", "s1", "s2"):
        _same(Neighbours, q.neighbours(index, "pets", tiny.id(seed)).value)
    for name in ("A", "D", "E", "s0", "S0", "C"):
        _same(Provenance, q.provenance(index, tiny.id(name)).value)
    _same(Page[DedupGroup], q.dedup_groups(db, index, None, 10, None).body.value)
    _same(ClusterMap, q.cluster_map(index).value)
