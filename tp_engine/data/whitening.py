"""PCA whitening, fitted on a training split and applied to all three."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tp_engine.data.common import DataError


@dataclass
class PCAWhitening:
    """PCA whitening fitted on a training split: ``z = ((x - mean) @ components) * scale``.

    ``components`` holds the covariance eigenvectors as columns, sorted by decreasing eigenvalue;
    ``scale = 1 / sqrt(eigenvalue + eps * mean(eigenvalues))``. The epsilon is relative to the
    average eigenvalue so it means the same thing whatever the input's scale; it keeps
    near-constant directions (e.g. MNIST's blank border pixels) from being blown up. All
    components are kept, so the transform is invertible.
    """

    mean: np.ndarray  # (d,)
    components: np.ndarray  # (d, d)
    scale: np.ndarray  # (d,)
    eigenvalues: np.ndarray | None = None  # (d,) covariance eigenvalues, decreasing; informative only

    @classmethod
    def fit(cls, x: np.ndarray, eps: float = 1e-2, chunk: int = 8192) -> PCAWhitening:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] < 2:
            raise DataError(f"cannot fit whitening on an array of shape {x.shape}; need at least 2 rows of a 2-D array")
        mean = x.mean(axis=0, dtype=np.float64)
        # Accumulate the covariance in float64 chunk by chunk: exact enough for the small
        # eigenvalues, without a full float64 copy of the data.
        cov = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
        for start in range(0, x.shape[0], chunk):
            xc = x[start:start + chunk].astype(np.float64) - mean
            cov += xc.T @ xc
        cov /= x.shape[0] - 1
        eigvals, eigvecs = np.linalg.eigh(cov)
        eigvals = np.clip(eigvals[::-1], 0.0, None)  # descending; tiny negatives are round-off
        eigvecs = eigvecs[:, ::-1]
        floor = eps * max(float(eigvals.mean()), np.finfo(np.float64).tiny)
        scale = 1.0 / np.sqrt(eigvals + floor)
        return cls(
            mean=mean.astype(np.float32),
            components=np.ascontiguousarray(eigvecs, dtype=np.float32),
            scale=scale.astype(np.float32),
            eigenvalues=eigvals.astype(np.float32),
        )

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return ((x - self.mean) @ self.components) * self.scale

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float32)
        return (z / self.scale) @ self.components.T + self.mean

