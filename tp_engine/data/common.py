"""What the data sources share: the error type, the Dataset container, the in-process cache of
loaded arrays, checksums, a download lock, and the IDX file format (MNIST and Fashion-MNIST)."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import pathlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tp_engine.data import DEFAULT_CACHE_DIR

if TYPE_CHECKING:
    from tp_engine.data.whitening import PCAWhitening

Splits = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

# Loaded real datasets, keyed by (kind, path, file stats), so repeated loads in one process skip
# decompression and unpickling. A file rewritten in place gets new stats and is read again.
ARRAY_CACHE: dict[tuple, Splits] = {}
# Files whose size + sha256 were already checked in this process, keyed the same way.
VERIFIED: set[tuple] = set()


class DataError(Exception):
    """A user-facing data problem (missing or corrupt file, unknown name); the message says what to do."""


@dataclass
class Dataset:
    """Train / valid / test splits of one dataset.

    ``x_*`` are float32 of shape (n, d), always flattened; ``y_*`` are int64 class labels of
    shape (n,).

    ``image_shape`` says how to turn a row back into a picture (``None`` for synthetic sets):

    * mnist, fashion_mnist ``(28, 28)``: ``row.reshape(28, 28)``.
    * cifar10 ``(32, 32, 3)``: rows keep CIFAR's channel-major layout, so draw with
      ``row.reshape(3, 32, 32).transpose(1, 2, 0)``; a plain ``reshape(32, 32, 3)`` scrambles
      the image. :meth:`images` does this for you.

    If the data were whitened, ``whitening`` is the fitted transform; rows must go through
    ``whitening.inverse_transform`` before they look like images again.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    image_shape: tuple[int, ...] | None
    whitening: PCAWhitening | None

    def images(self, x: np.ndarray) -> np.ndarray:
        """Rows of ``x`` (un-whitened) as images: (n, 28, 28) for mnist, (n, 32, 32, 3) for cifar10."""
        if self.image_shape is None:
            raise DataError(f"dataset {self.name!r} has no image shape; only image sets can be drawn")
        x = np.asarray(x)
        if self.whitening is not None:
            x = self.whitening.inverse_transform(x)
        if self.image_shape == (32, 32, 3):
            return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x.reshape((-1, *self.image_shape))


def cache_root(cache_dir: str | None) -> pathlib.Path:
    """The download cache: ``cache_dir``, else :data:`DEFAULT_CACHE_DIR` under the working
    directory. Not created here: a source creates what it writes."""
    return pathlib.Path(cache_dir).expanduser() if cache_dir else pathlib.Path.cwd() / DEFAULT_CACHE_DIR


def stat_key(paths: list[pathlib.Path]) -> tuple:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def cached(key: tuple, load: Callable[[], Splits]) -> Splits:
    if key not in ARRAY_CACHE:
        ARRAY_CACHE[key] = load()
    return ARRAY_CACHE[key]


def split_off_valid(x: np.ndarray, y: np.ndarray, fraction_den: int) -> tuple[tuple, tuple]:
    """Last 1/fraction_den of the rows -> validation (10000 of MNIST's 60000, 5000 of CIFAR's 50000)."""
    n_valid = len(x) // fraction_den
    cut = len(x) - n_valid
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: pathlib.Path) -> Iterator[None]:
    """Exclusive lock so concurrent processes (e.g. Ray trials) download only once.

    Correctness does not depend on it (the final file appears by atomic rename); where fcntl is
    unavailable it is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# IDX files (MNIST's own format, also Fashion-MNIST's)
# --------------------------------------------------------------------------------------------------

# name of each standard IDX file -> its role
IDX_FILES = {
    "train-images-idx3-ubyte": "x_train",
    "train-labels-idx1-ubyte": "y_train",
    "t10k-images-idx3-ubyte": "x_test",
    "t10k-labels-idx1-ubyte": "y_test",
}


def from_train_test(x_train, y_train, x_test, y_test, source: pathlib.Path) -> Splits:
    """Flatten, scale uint8 pixels to [0, 1] and split the last sixth of train off as valid."""
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise DataError(f"MNIST data in {source} has mismatched image and label counts")

    def prep(x):
        x = np.asarray(x).reshape(len(x), -1).astype(np.float32)
        return x / np.float32(255.0)
    train, valid = split_off_valid(prep(x_train), np.asarray(y_train, dtype=np.int64), 6)
    return train, valid, (prep(x_test), np.asarray(y_test, dtype=np.int64))


def find_idx_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    found, missing = {}, []
    for stem, role in IDX_FILES.items():
        # Accept the canonical names, gzipped or not, and the common "train-images.idx3-ubyte" variant.
        dotted = stem.replace("-idx", ".idx")
        candidates = [directory / n for n in (stem, stem + ".gz", dotted, dotted + ".gz")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(stem + "[.gz]")
        else:
            found[role] = hit
    if missing:
        raise DataError(f"MNIST directory {directory} lacks IDX file(s) {', '.join(missing)}")
    return found


def read_idx(path: pathlib.Path) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
    # one big-endian uint32 per dimension.
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    data = np.frombuffer(raw, dtype=np.uint8, offset=min(header, len(raw)))
    if len(dims) != ndim or data.size != int(np.prod(dims)):
        raise DataError(f"IDX file {path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def read_idx_splits(files: dict[str, pathlib.Path]) -> Splits:
    arrays = {role: read_idx(p) for role, p in files.items()}
    return from_train_test(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                           source=files["x_train"].parent)
