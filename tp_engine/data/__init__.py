"""Datasets for the engine: real image sets (MNIST, Fashion-MNIST, CIFAR-10) and small synthetic
problems, one module per source, behind :func:`load_dataset`.

Every dataset comes back as a :class:`Dataset` with train / valid / test splits, inputs as
flattened 2-D float32 arrays and labels as int64 class indices. Loading is deterministic for a
given ``seed``; only ``np.random.default_rng(seed)`` is used, never the global numpy RNG.

Modules: ``common`` (DataError, Dataset, the in-process cache, checksums, file locks, IDX files),
``mnist``, ``fashion_mnist``, ``cifar10``, ``synthetic`` (spiral, xor, sphere, ball, annulus,
torus), ``whitening`` (PCA). Each source module has ``load(name, *, rng, data_path, cache_dir)``
returning the three (x, y) splits; :data:`SOURCES` below registers it under its name(s).

Downloads go to the cache directory the caller passes (``cache_dir``; the engine never reads
``SWEEP_DATA_DIR``: the worker and the CLI decide), by default :data:`DEFAULT_CACHE_DIR` relative
to the working directory.

Note that pickled data files (``mnist.pkl.gz``, CIFAR batches) can run code when unpickled: only
point ``data_path`` at files you trust. The downloaded MNIST file is checksummed before use.

This module imports no NumPy (the config and the spec read :data:`DATASETS` from it and stay
fast to import); the classes are loaded on first use.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tp_engine.data.common import Dataset, DataError, Splits
    from tp_engine.data.whitening import PCAWhitening

# Relative to the working directory; the worker passes $SWEEP_DATA_DIR/cache instead.
DEFAULT_CACHE_DIR = "sweep_data/cache"


@dataclass(frozen=True)
class Source:
    """Where a dataset comes from and what its rows are."""

    module: str  # the module of this package whose load() makes it
    n_classes: int
    # How a row becomes a picture (see Dataset.image_shape); None: not an image set. Image sets
    # hold pixels in [0, 1], which is why the autoencoder's default loss is sigmoid_ce on them.
    image_shape: tuple[int, ...] | None = None
    # Rows of the training split (before any subset); None where it depends on the call.
    train_rows: int | None = None


# The registry: one line per dataset. Registration order is the order of DATASETS (and of the
# names the spec lists in its errors).
SOURCES: dict[str, Source] = {
    "mnist": Source("mnist", 10, (28, 28), 50_000),
    "fashion_mnist": Source("fashion_mnist", 10, (28, 28), 50_000),
    "cifar10": Source("cifar10", 10, (32, 32, 3), 45_000),
    "spiral": Source("synthetic", 2),
    "xor": Source("synthetic", 2),
    "sphere": Source("synthetic", 2),
    "ball": Source("synthetic", 2),
    "annulus": Source("synthetic", 2),
    "torus": Source("synthetic", 2),
}
DATASETS: tuple[str, ...] = tuple(SOURCES)
SYNTHETIC: tuple[str, ...] = tuple(n for n, s in SOURCES.items() if s.module == "synthetic")

# Names re-exported from the submodules, imported when first asked for (they need NumPy).
_LAZY = {"Dataset": "common", "DataError": "common", "Splits": "common", "PCAWhitening": "whitening"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    subset: int | None = None,
    whiten: bool = False,
    data_path: str | None = None,
    cache_dir: str | None = None,
) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`) as a :class:`Dataset`.

    ``subset=n`` keeps a seeded random n rows of each split (capped at the split's size).
    ``whiten=True`` fits :class:`PCAWhitening` on the (possibly subsetted) training split and
    applies it to all three splits. ``data_path`` points at a local copy of a real dataset
    (overrides ``$MNIST_PATH`` / ``$CIFAR10_PATH``); ``cache_dir`` is the download cache
    (default :data:`DEFAULT_CACHE_DIR`). The returned arrays are the caller's own copies.
    """
    import numpy as np

    from tp_engine.data.common import Dataset, DataError
    from tp_engine.data.whitening import PCAWhitening

    key = str(name).strip().lower()
    if key not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1):
        raise DataError(f"subset must be a positive integer or None, got {subset!r}")
    source = SOURCES[key]
    rng = np.random.default_rng(seed)
    # Synthetic sets are generated from the same rng that then draws the subset, so the full set
    # for a seed is the same whatever the subset.
    loader = importlib.import_module(f"{__name__}.{source.module}")
    splits = loader.load(key, rng=rng, data_path=data_path, cache_dir=cache_dir)

    parts = []
    for x, y in splits:
        if subset is not None and subset < len(x):
            idx = np.sort(rng.choice(len(x), size=int(subset), replace=False))
            x, y = x[idx], y[idx]
        # Always copy: the real-data splits are shared through the in-process cache.
        parts.append((np.array(x, dtype=np.float32), np.array(y, dtype=np.int64)))
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = parts

    whitening = None
    if whiten:
        whitening = PCAWhitening.fit(x_tr)
        x_tr, x_va, x_te = (whitening.transform(a) for a in (x_tr, x_va, x_te))

    return Dataset(
        name=key,
        x_train=x_tr, y_train=y_tr,
        x_valid=x_va, y_valid=y_va,
        x_test=x_te, y_test=y_te,
        n_classes=source.n_classes,
        image_shape=source.image_shape,
        whitening=whitening,
    )
