"""CIFAR-10: the ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``), never
downloaded. It is read from ``data_path``, ``$CIFAR10_PATH``, or beside the cache directory
(``<cache_dir>/../cifar-10-batches-py``: ``$SWEEP_DATA_DIR/cifar-10-batches-py`` for a sweep). The
last tenth of the training rows (5000) becomes the validation split. Rows keep CIFAR's
channel-major layout (see ``Dataset.image_shape``).
"""
from __future__ import annotations

import os
import pathlib
import pickle

import numpy as np

from tp_engine.data import common
from tp_engine.data.common import DataError, Splits

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def load(name: str, *, rng: np.random.Generator, data_path: str | None, cache_dir: str | None) -> Splits:
    if data_path:
        root, origin = pathlib.Path(data_path).expanduser(), "data_path"
    elif os.environ.get("CIFAR10_PATH"):
        root, origin = pathlib.Path(os.environ["CIFAR10_PATH"]).expanduser(), "$CIFAR10_PATH"
    else:
        # Beside the cache, where it has always been looked for (the data directory).
        root, origin = common.cache_root(cache_dir).parent / "cifar-10-batches-py", "the default location"
    # Also accept the folder the tarball was extracted into.
    if not (root / CIFAR10_FILES[0]).exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [n for n in CIFAR10_FILES if not (root / n).is_file()]
    if missing:
        what = "directory does not exist" if not root.is_dir() else f"missing {', '.join(missing)}"
        raise DataError(
            f"CIFAR-10 not found at {root} ({origin}; {what}); extract cifar-10-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and set CIFAR10_PATH=/path/to/cifar-10-batches-py "
            f"or pass data_path")
    files = [root / n for n in CIFAR10_FILES]
    return common.cached(("cifar10", common.stat_key(files)), lambda: _read_cifar10(files))


def _read_cifar_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as e:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {e}") from e
    if data is None or labels is None:
        raise DataError(f"CIFAR-10 batch {path} has no b'data' / b'labels' entries; is it from cifar-10-python.tar.gz?")
    data = np.asarray(data, dtype=np.uint8).reshape(len(data), -1)
    labels = np.asarray(labels, dtype=np.int64)
    if data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"CIFAR-10 batch {path} has data of shape {data.shape} and {len(labels)} labels; expected (n, 3072) and n")
    return data, labels


def _read_cifar10(files: list[pathlib.Path]) -> Splits:
    batches = [_read_cifar_batch(p) for p in files]
    x = np.concatenate([b[0] for b in batches[:5]]).astype(np.float32) / np.float32(255.0)
    y = np.concatenate([b[1] for b in batches[:5]])
    train, valid = common.split_off_valid(x, y, 10)
    x_test = batches[5][0].astype(np.float32) / np.float32(255.0)
    return train, valid, (x_test, batches[5][1])
