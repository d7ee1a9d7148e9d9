"""Duplicate groups from pair lists: connected components and one representative per group.

Shared by the PCA-hash and copy-detection passes. Pure numpy/scipy, vectorised: no Python loop
runs over nodes or edges, so 10M nodes and tens of millions of edges take seconds.
"""

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as _scipy_components


def _as_index_array(values: np.ndarray, n: int, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= n):
        raise ValueError(f"{name} holds node indices outside [0, {n})")
    return array.astype(np.int64, copy=False)


def connected_components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Label of each of `n` nodes joined by the edges (left[k], right[k]).

    The label is the smallest node index in the node's component, so it does not depend on the
    order of the edges or on how scipy numbers components.
    """
    left = _as_index_array(left, n, "left")
    right = _as_index_array(right, n, "right")
    if left.shape != right.shape:
        raise ValueError(f"left and right differ in length: {left.size} != {right.size}")
    nodes = np.arange(n, dtype=np.int64)
    if left.size == 0:
        return nodes
    # int8 data keeps the sparse matrix small; duplicate edges are summed, which is harmless.
    weights = np.ones(left.size, dtype=np.int8)
    graph = coo_matrix((weights, (left, right)), shape=(n, n)).tocsr()
    # A weak-connectivity pass over the directed edges gives the same components as the
    # undirected one without scipy first building the transposed copy of the graph.
    count, component = _scipy_components(graph, directed=True, connection="weak")
    smallest = np.full(count, n, dtype=np.int64)
    np.minimum.at(smallest, component, nodes)
    return smallest[component]


def representatives(labels: np.ndarray, area: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each node, the index of its group's representative.

    The representative is the member with the largest `area` (pixel count); ties go to the
    smallest `order` (first seen in source order), then to the smallest node index.
    """
    labels = np.asarray(labels)
    area = np.asarray(area)
    order = np.asarray(order)
    if not (labels.shape == area.shape == order.shape) or labels.ndim != 1:
        raise ValueError(
            f"labels, area and order must be 1-D of one length, got "
            f"{labels.shape}, {area.shape}, {order.shape}"
        )
    representative = np.arange(labels.size, dtype=np.int64)
    grouped = _grouped_nodes(labels)
    if grouped.size == 0:
        return representative
    # float64 holds any realistic pixel count exactly and negates safely, unlike unsigned ints.
    larger_first = -area[grouped].astype(np.float64)
    # lexsort is stable, so equal (label, area, order) keys keep node order: ties are resolved.
    ranked = grouped[np.lexsort((order[grouped], larger_first, labels[grouped]))]
    ranked_labels = labels[ranked]
    group_starts = np.ones(ranked.size, dtype=bool)
    group_starts[1:] = ranked_labels[1:] != ranked_labels[:-1]
    group_of_rank = np.cumsum(group_starts) - 1
    representative[ranked] = ranked[group_starts][group_of_rank]
    return representative


def _grouped_nodes(labels: np.ndarray) -> np.ndarray:
    """Indices of nodes that share their label with another node.

    Nearly every image is alone in its group, and a singleton is its own representative, so only
    the grouped nodes need the three-key sort.
    """
    n = labels.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() < n:
        sizes = np.bincount(labels, minlength=n)
        return np.flatnonzero(sizes[labels] > 1)
    _, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    return np.flatnonzero(sizes[inverse] > 1)
