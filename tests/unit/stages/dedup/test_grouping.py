import numpy as np
import pytest

from curate.stages.dedup.grouping import connected_components, representatives


def _union_find_labels(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    """Reference: plain union-find, each component labelled by its smallest node."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(x) for x in range(n)])


def test_components_are_labelled_by_their_smallest_node():
    left = np.array([5, 3, 6])
    right = np.array([3, 1, 4])
    labels = connected_components(7, left, right)
    assert labels.dtype == np.int64
    assert labels.tolist() == [0, 1, 2, 1, 4, 1, 4]


def test_components_do_not_depend_on_edge_order_or_direction():
    left = np.array([8, 2, 2, 9, 0])
    right = np.array([2, 7, 7, 0, 9])  # a repeated edge and a back-and-forth pair
    labels = connected_components(10, left, right)
    flipped = connected_components(10, right[::-1], left[::-1])
    assert labels.tolist() == flipped.tolist()
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 2, 2, 0]


def test_no_edges_leaves_every_node_alone():
    empty = np.zeros(0, dtype=np.int64)
    assert connected_components(4, empty, empty).tolist() == [0, 1, 2, 3]
    assert connected_components(0, empty, empty).size == 0


def test_components_match_union_find_on_a_random_graph():
    rng = np.random.default_rng(3)
    n = 3000
    left = rng.integers(0, n, 2500)
    right = rng.integers(0, n, 2500)
    expected = _union_find_labels(n, list(zip(left.tolist(), right.tolist(), strict=True)))
    assert connected_components(n, left, right).tolist() == expected.tolist()


def test_components_reject_bad_edges():
    with pytest.raises(ValueError):
        connected_components(3, np.array([0]), np.array([3]))
    with pytest.raises(ValueError):
        connected_components(3, np.array([0, 1]), np.array([2]))


def test_representative_is_the_largest_then_the_first_seen():
    labels = np.array([0, 0, 0, 3, 3, 5, 6, 6])
    area = np.array([10, 30, 30, 5, 5, 7, 4, 4])
    order = np.array([2, 1, 0, 9, 8, 0, 3, 3])
    # group 0: nodes 1 and 2 share the largest area, node 2 was seen first;
    # group 3: equal areas, node 4 first seen; group 6: area and order tie, smaller index wins.
    assert representatives(labels, area, order).tolist() == [2, 2, 2, 4, 4, 5, 6, 6]


def test_representative_prefers_area_over_source_order():
    labels = np.array([0, 0, 0])
    area = np.array([100, 400, 399], dtype=np.uint32)  # unsigned: must not wrap when ranked
    order = np.array([0, 2, 1])
    assert representatives(labels, area, order).tolist() == [1, 1, 1]


def test_representatives_accept_any_label_values():
    labels = np.array([-7, 42, -7, 42, 1_000_000])
    area = np.array([1, 2, 3, 2, 1])
    order = np.array([0, 1, 2, 0, 4])
    assert representatives(labels, area, order).tolist() == [2, 3, 2, 3, 4]


def test_representatives_of_components():
    labels = connected_components(6, np.array([0, 4, 2]), np.array([2, 5, 1]))
    area = np.array([50, 80, 80, 10, 20, 20])
    order = np.array([5, 4, 3, 2, 1, 0])
    assert representatives(labels, area, order).tolist() == [2, 2, 2, 3, 5, 5]


def test_representatives_reject_mismatched_lengths():
    with pytest.raises(ValueError):
        representatives(np.array([0, 0]), np.array([1]), np.array([0, 1]))


def test_a_copy_of_any_file_of_a_hash_group_joins_the_whole_group():
    from curate.stages.dedup.decide import copy_groups

    # Hash group {0, 1} kept 1 (its padded copy: the larger file); 2 is a crop of 0, not of 1;
    # 3 stands alone; 4 and 5 are a hash group of their own.
    area = np.array([100, 150, 60, 80, 90, 70])
    order = np.arange(6)
    group = np.array([1, 1, 2, 3, 4, 4])
    final = copy_groups(group, np.array([0]), np.array([2]), area, order)
    assert final.tolist() == [1, 1, 1, 3, 4, 4]
    # An edge between two hash groups joins both; the larger representative keeps them.
    final = copy_groups(group, np.array([5]), np.array([0]), area, order)
    assert final.tolist() == [1, 1, 2, 3, 1, 1]
    assert copy_groups(group, np.array([], int), np.array([], int), area, order).tolist() == [
        1,
        1,
        2,
        3,
        4,
        4,
    ]
