"""Shared by the cluster stage's tests: planted clusters."""

import numpy as np

from curate.core.vectors import unit_rows


def planted(
    k: int, per: int, d: int, noise: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, true labels, unit centers): `per` noisy copies of each of k random directions."""
    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.standard_normal((k, d)))
    labels = np.repeat(np.arange(k), per)
    noise_rows = rng.standard_normal((k * per, d)).astype(np.float32) * noise / np.sqrt(d)
    return centers[labels] + noise_rows, labels, centers
