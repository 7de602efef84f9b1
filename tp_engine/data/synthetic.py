"""Synthetic datasets: 2 classes; 3000 train / 1000 valid / 1000 test; features standardized with
the training split's mean and standard deviation. Generated from the caller's ``rng``.

spiral
    2-D. Two interleaved spiral arms (1.5 turns each, radius growing from 0.1 to 1), the second
    arm rotated by pi; Gaussian noise with std 0.03. Class = arm. Balanced.
xor
    2-D. Points uniform in [-1, 1]^2; class 1 when sign(x0) == sign(x1). About balanced.
sphere
    3-D. Points near the unit sphere (class 0) or near the sphere of radius 2 (class 1): uniform
    direction, radius plus Gaussian noise with std 0.1. Balanced.
ball
    10-D. Standard normal points; class 1 when outside the ball whose radius is the median norm
    (sqrt of the chi-square(10) median, about 3.06), so the classes are about balanced.
annulus
    2-D. Uniform in the disk of radius 1 (class 0) or uniform in the ring 1.3 <= r <= 2
    (class 1). Balanced.
torus
    3-D. Two linked rings ("chain links"): class 0 lies near the unit circle in the xy-plane,
    class 1 near the unit circle in the xz-plane centred at (1, 0, 0), which threads through the
    first. Points are a uniform angle on the ring plus isotropic Gaussian noise with std 0.1.
    Balanced.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tp_engine.data.common import Splits

SYNTHETIC_SIZES: tuple[int, int, int] = (3000, 1000, 1000)  # train, valid, test


def load(name: str, *, rng: np.random.Generator, data_path: str | None, cache_dir: str | None) -> Splits:
    splits = [_GENERATORS[name](rng, n) for n in SYNTHETIC_SIZES]
    # Standardize with training statistics only, so valid/test see the same transform.
    mean = splits[0][0].mean(axis=0)
    std = splits[0][0].std(axis=0)
    std[std == 0] = 1.0
    return tuple(((x - mean) / std, y) for x, y in splits)  # type: ignore[return-value]


def _balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    y = np.zeros(n, dtype=np.int64)
    y[n // 2:] = 1
    return rng.permutation(y)


def _unit_vectors(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _spiral(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = _balanced_labels(rng, n)
    t = rng.uniform(0.0, 1.0, n)
    radius = 0.1 + 0.9 * t
    angle = 3.0 * np.pi * t + np.pi * y
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return x + rng.normal(0.0, 0.03, x.shape), y


def _xor(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-1.0, 1.0, (n, 2))
    y = (np.sign(x[:, 0]) == np.sign(x[:, 1])).astype(np.int64)
    return x, y


def _sphere(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = _balanced_labels(rng, n)
    radius = 1.0 + y + rng.normal(0.0, 0.1, n)
    return _unit_vectors(rng, n, 3) * radius[:, None], y


_BALL_DIM = 10
_CHI2_10_MEDIAN = 9.341817765591966  # median of chi-square with 10 dof: median squared norm of N(0, I_10)


def _ball(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, _BALL_DIM))
    y = (np.einsum("ij,ij->i", x, x) > _CHI2_10_MEDIAN).astype(np.int64)
    return x, y


def _annulus(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = _balanced_labels(rng, n)
    # Uniform in area: r^2 uniform between the inner and outer radius squared.
    r_in = np.where(y == 0, 0.0, 1.3)
    r_out = np.where(y == 0, 1.0, 2.0)
    radius = np.sqrt(rng.uniform(r_in**2, r_out**2))
    angle = rng.uniform(0.0, 2.0 * np.pi, n)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1), y


def _torus(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = _balanced_labels(rng, n)
    phi = rng.uniform(0.0, 2.0 * np.pi, n)
    c, s, z = np.cos(phi), np.sin(phi), np.zeros(n)
    ring0 = np.stack([c, s, z], axis=1)          # unit circle in the xy-plane
    ring1 = np.stack([1.0 + c, z, s], axis=1)    # unit circle in the xz-plane through the first
    x = np.where(y[:, None] == 0, ring0, ring1)
    return x + rng.normal(0.0, 0.1, x.shape), y


_GENERATORS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = {
    "spiral": _spiral, "xor": _xor, "sphere": _sphere, "ball": _ball, "annulus": _annulus, "torus": _torus,
}
