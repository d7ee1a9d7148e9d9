"""The PCA-hash basis: a PCA projection fitted on a sample of the job's features, whitened and
rotated by ITQ, whose signs are the code bits (`PCAHasher`); saved with the job as .npz.
"""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.core.atomic import atomic_path
from curate.core.storage import fetch

# -- defaults, and how they were chosen -----------------------------------------------------------
#
# Measured on the demo corpus, with the basis fitted on another (see the package docstring).
# - 64 bits: 32 bits cannot keep a billion images apart (one random pair in a million falls
#   within radius 3); 128 bits need twice the radius for the same recall, and the exact search
#   pays for radius exponentially.
# - ITQ on the whitened projection: +2-3 points of recall on the hardest edit over plain PCA
#   signs at radius 4-6, under one point on average. ITQ on the raw projection halved
#   precision: the rotation spreads the few dominant components over every bit, so look-alike
#   images agree on most bits.
PCA_HASH_BITS = 64
ITQ_ITERATIONS = 50
# Enough images for a stable 143x143 covariance and a 64x64 rotation; more only costs time.
PCA_FIT_SAMPLE = 100_000


def _single_threaded_blas() -> AbstractContextManager:
    """One BLAS thread for the fit: its many small matrix products and 64x64 SVDs ran up to 100x
    slower on a loaded 2-core host with OpenBLAS threads spinning against each other.
    """
    try:
        from threadpoolctl import threadpool_limits  # installed with imagededup (scikit-learn)
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _sign_fixed(vectors: np.ndarray) -> np.ndarray:
    """Columns flipped so each one's largest entry is positive: eigenvectors become unique."""
    largest = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[largest, np.arange(vectors.shape[1])])
    return vectors * np.where(signs == 0, 1.0, signs)


def _random_rotation(bits: int, seed: int) -> np.ndarray:
    gaussian = np.random.default_rng(seed).standard_normal((bits, bits))
    q, r = np.linalg.qr(gaussian)
    return q * np.sign(np.diag(r))  # the sign fix makes Q the unique Haar-distributed factor


def _itq_rotation(projected: np.ndarray, iterations: int, seed: int) -> np.ndarray:
    """Iterative quantisation (Gong & Lazebnik, 2011): the rotation R minimising
    ||sign(V R) - V R||, found by alternating the binary codes and an orthogonal Procrustes step.
    """
    rotation = _random_rotation(projected.shape[1], seed)
    for _ in range(iterations):
        binary = np.where(projected @ rotation >= 0, 1.0, -1.0)
        u, _, vt = np.linalg.svd(projected.T @ binary)
        rotation = u @ vt
    return rotation


@dataclass(frozen=True, eq=False)  # array fields: identity, not elementwise, equality
class PCAHasher:
    """A fitted PCA-hash basis: codes = sign((x - mean) @ components.T @ rotation), packed."""

    mean: np.ndarray  # [D]
    components: np.ndarray  # [bits, D] principal axes, scaled to unit variance on the sample
    rotation: np.ndarray  # [bits, bits] ITQ rotation (identity without ITQ)
    bits: int

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        bits: int = PCA_HASH_BITS,
        itq_iterations: int = ITQ_ITERATIONS,
        seed: int = 0,
        sample_size: int = PCA_FIT_SAMPLE,
    ) -> "PCAHasher":
        """Fit on [N, D] features (at most `sample_size` rows are used, drawn with `seed`)."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {features.shape}")
        n, dim = features.shape
        if bits <= 0 or bits % 8 or bits > dim:
            raise ValueError(f"bits must be a positive multiple of 8 and <= {dim}, got {bits}")
        if n <= bits:
            raise ValueError(f"fitting {bits} bits needs more than {bits} samples, got {n}")
        if n > sample_size:
            rng = np.random.default_rng(seed)
            features = features[np.sort(rng.choice(n, sample_size, replace=False))]
        with _single_threaded_blas():
            return cls._fit_sample(features, bits, itq_iterations, seed)

    @classmethod
    def _fit_sample(
        cls, features: np.ndarray, bits: int, itq_iterations: int, seed: int
    ) -> "PCAHasher":
        mean = features.mean(axis=0)
        centred = features - mean
        variances, axes = np.linalg.eigh(centred.T @ centred / len(centred))
        top = np.argsort(variances)[::-1][:bits]
        axes = _sign_fixed(axes[:, top])
        # Whitening before ITQ gives every principal direction an equal say in the rotation.
        floor = max(float(variances[top[0]]) * 1e-12, 1e-30)
        components = (axes / np.sqrt(np.maximum(variances[top], floor))).T
        if itq_iterations > 0:
            rotation = _itq_rotation(centred @ components.T, itq_iterations, seed)
        else:
            rotation = np.eye(bits)
        return cls(
            mean=mean.astype(np.float32),
            components=components.astype(np.float32),
            rotation=rotation.astype(np.float32),
            bits=bits,
        )

    def project(self, features: np.ndarray) -> np.ndarray:
        """Real-valued [N, bits] projections whose signs are the code bits."""
        features = np.asarray(features, dtype=np.float32)
        return (features - self.mean) @ (self.components.T @ self.rotation)

    def codes(self, features: np.ndarray) -> np.ndarray:
        """Packed sign bits, uint8 [N, bits // 8] (faiss binary layout)."""
        return np.packbits(self.project(features) >= 0, axis=1)

    def save(self, path: str | Path) -> None:
        """Write the basis as .npz, atomically (temporary file renamed into place)."""
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as out:
            # A file object, not the name: np.savez would append ".npz" to the temporary name.
            np.savez(
                out,
                mean=self.mean,
                components=self.components,
                rotation=self.rotation,
                bits=np.int64(self.bits),
            )

    @classmethod
    def dct_signs(cls, dim: int, bits: int = PCA_HASH_BITS) -> "PCAHasher":
        """The basis for jobs too small to estimate `bits` principal axes: the signs of the
        lowest DCT coefficients themselves (the features are mean-free already)."""
        return cls(
            mean=np.zeros(dim, np.float32),
            components=np.eye(bits, dim, dtype=np.float32),
            rotation=np.eye(bits, dtype=np.float32),
            bits=bits,
        )

    @classmethod
    def load(cls, path: str | Path) -> "PCAHasher":
        with np.load(fetch(path), allow_pickle=False) as data:
            return cls(
                mean=data["mean"],
                components=data["components"],
                rotation=data["rotation"],
                bits=int(data["bits"]),
            )
