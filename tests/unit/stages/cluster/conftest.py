"""Shared by the cluster stage's tests: one FAISS thread, and planted clusters."""

import faiss
import numpy as np
import pytest

from curate.core.vectors import unit_rows


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin while waiting: on a shared 2-core machine two of them turn
    PQ training from 3 s into 20 s. The results do not depend on the thread count."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def planted(
    k: int, per: int, d: int, noise: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, true labels, unit centers): `per` noisy copies of each of k random directions."""
    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.standard_normal((k, d)))
    labels = np.repeat(np.arange(k), per)
    noise_rows = rng.standard_normal((k * per, d)).astype(np.float32) * noise / np.sqrt(d)
    return centers[labels] + noise_rows, labels, centers
