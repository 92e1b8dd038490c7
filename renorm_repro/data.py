"""Datasets for the reproduction, framework-free: NumPy arrays out.

Every loader returns a :class:`Dataset`: ``uint8`` images of shape
``(N, H, W, C)`` and ``int64`` labels, for a train and a test split. The model
normalizes on the device (per-channel mean and std of the training set, kept in
``Dataset.mean``/``Dataset.std``).

- ``cifar100``: the real CIFAR-100 (python format). Downloaded once into a cache
  directory, or read from ``data_dir`` (the extracted ``cifar-100-python/``
  folder, its parent, or the ``.tar.gz``). Every file is checked against its
  published MD5 sum before it is unpickled, so a truncated or corrupt file is
  an error, never half a dataset.
- ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8
  grayscale images, 10 classes, offline). Pixel values 0..16 are rescaled to
  0..255 (``round(v * 255 / 16)``); the split is a fixed stratified one
  (500 test images, 50 per class, chosen with seed 0), the same for every run.
- ``fashion_mnist``: Zalando's Fashion-MNIST (60000/10000 28x28x1 images,
  10 classes) from its four IDX files (``.gz`` or decompressed), looked for in
  ``data_dir``, then in the folder where Debian's ``dataset-fashion-mnist``
  package installed them (asked of ``dpkg -L`` at run time), then in the cache,
  and downloaded into the cache as a last resort. The *decompressed* contents
  are checked against their MD5 sums (Debian recompresses the ``.gz`` files),
  and the IDX header (magic number, dimensions, size) is checked first, so a
  wrong or truncated file is an error naming it.
- ``synthetic``: :func:`write_synthetic_cifar100` writes small files in the
  exact CIFAR-100 python format, which are then read by the real loader (with
  the checksums of the files written). Each class has a fixed random 32x32x3
  template; an image is ``template + noise``, so the class is learnable.

Every dataset is one entry of :data:`DATASETS` (a :class:`DatasetSpec`: name,
image shape, classes, split sizes, loader); the configs, the CLI and the
benchmarks read it from there. :func:`with_validation_split` carves a fixed,
stratified validation split out of the training set (``val_examples`` in the
configs): choices are made on it, never on the test split.

The data order of training (:func:`batch_indices`) is a pure function of
``(seed, step)``, so a resumed run sees exactly the batches it would have seen.
The non-i.i.d. sampler of the paper's section 4.3 is :func:`noniid_batch_indices`;
:func:`split_pairs_order` arranges its batches so that consecutive groups split the pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import pickle
import struct
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "CIFAR100_URL",
    "CIFAR100_ARCHIVE",
    "CIFAR100_FOLDER",
    "CIFAR100_ARCHIVE_MD5",
    "CIFAR100_MD5",
    "DataError",
    "Dataset",
    "default_cache_dir",
    "md5sum",
    "load_cifar100",
    "download_cifar100",
    "load_digits",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_URL",
    "FASHION_MNIST_DEBIAN_PACKAGE",
    "read_idx",
    "write_idx",
    "debian_fashion_mnist_dir",
    "load_fashion_mnist",
    "download_fashion_mnist",
    "with_validation_split",
    "DatasetSpec",
    "write_synthetic_cifar100",
    "load_synthetic",
    "load_dataset",
    "batch_indices",
    "noniid_batch_indices",
    "split_pairs_order",
    "DATASETS",
]

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"
#: Published MD5 sums (https://www.cs.toronto.edu/~kriz/cifar.html and torchvision).
CIFAR100_ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


class DataError(RuntimeError):
    """A dataset is missing, truncated, corrupt or not in the expected format."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test splits as NumPy arrays (``uint8`` images NHWC, ``int64`` labels)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    #: Held-out validation split carved from the training set (:func:`with_validation_split`), or None.
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean of the training images, in [0, 255] units (float32)."""
        return self.x_train.reshape(-1, self.x_train.shape[-1]).mean(axis=0).astype(np.float32)

    @property
    def std(self) -> np.ndarray:
        """Per-channel standard deviation of the training images (float32)."""
        return self.x_train.reshape(-1, self.x_train.shape[-1]).std(axis=0).astype(np.float32)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "train": int(len(self.y_train)),
            "test": int(len(self.y_test)),
            "validation": int(len(self.y_val)) if self.y_val is not None else 0,
            "image_shape": list(self.image_shape),
            "num_classes": int(self.num_classes),
        }


def default_cache_dir() -> Path:
    """``$RENORM_DATA`` if set, else ``~/.cache/renorm_repro``."""
    env = os.environ.get("RENORM_DATA")
    return Path(env) if env else Path.home() / ".cache" / "renorm_repro"


def md5sum(data_or_path) -> str:
    h = hashlib.md5()
    if isinstance(data_or_path, (bytes, bytearray)):
        h.update(data_or_path)
    else:
        with open(data_or_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------- CIFAR-100
def _check_md5(name: str, data: bytes, expected: str | None, where: str) -> None:
    if expected is None:
        return
    got = md5sum(data)
    if got != expected:
        raise DataError(
            f"CIFAR-100 file {name!r} in {where} is truncated or corrupt: its MD5 is {got} "
            f"({len(data)} bytes), expected {expected}. Delete it and download the dataset again "
            f"from {CIFAR100_URL}."
        )


def _unpickle(name: str, data: bytes, where: str) -> dict:
    try:
        obj = pickle.loads(data, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a format error
        raise DataError(f"CIFAR-100 file {name!r} in {where} cannot be unpickled ({e!r}).") from e
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR-100 file {name!r} in {where} holds a {type(obj).__name__}, expected a dict.")
    return obj


def _split_arrays(name: str, d: dict, where: str):
    for key in (b"data", b"fine_labels"):
        if key not in d:
            raise DataError(f"CIFAR-100 file {name!r} in {where} has no key {key!r} (keys: {sorted(d)}).")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[b"fine_labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"CIFAR-100 file {name!r} in {where}: 'data' has shape {data.shape} for {labels.shape[0]} labels, "
            f"expected (N, 3072)."
        )
    # Rows are 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_members_from_folder(folder: Path, checksums: dict[str, str | None]) -> dict[str, bytes]:
    out = {}
    for name, expected in checksums.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"CIFAR-100 file {name!r} is missing from {folder} (expected {path}).")
        data = path.read_bytes()
        _check_md5(name, data, expected, str(folder))
        out[name] = data
    return out


def _read_members_from_tarball(archive: Path, checksums, archive_md5: str | None) -> dict[str, bytes]:
    if archive_md5 is not None:
        got = md5sum(archive)
        if got != archive_md5:
            raise DataError(
                f"CIFAR-100 archive {archive} is truncated or corrupt: its MD5 is {got} "
                f"({archive.stat().st_size} bytes), expected {archive_md5}. Delete it and download it again "
                f"from {CIFAR100_URL}."
            )
    out = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name, expected in checksums.items():
                member = members.get(f"{CIFAR100_FOLDER}/{name}")
                if member is None:
                    raise DataError(
                        f"CIFAR-100 archive {archive} has no member '{CIFAR100_FOLDER}/{name}' "
                        f"(members: {sorted(members)[:10]})."
                    )
                data = tar.extractfile(member).read()
                _check_md5(name, data, expected, str(archive))
                out[name] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"CIFAR-100 archive {archive} is truncated or corrupt: {e!r}.") from e
    return out


def load_cifar100(
    path,
    *,
    checksums: dict[str, str | None] | None = None,
    archive_md5: str | None = None,
    name: str = "cifar100",
) -> Dataset:
    """Read CIFAR-100 from ``path``: the ``cifar-100-python/`` folder, its parent, or a ``.tar.gz``.

    ``checksums`` maps each of ``train``, ``test``, ``meta`` to its MD5 (the
    published sums by default); ``archive_md5`` is checked when ``path`` is an
    archive (the published sum by default for the real dataset). Raises
    :class:`DataError` on any missing, truncated or corrupt file.
    """
    path = Path(path)
    real = checksums is None
    checksums = dict(CIFAR100_MD5) if real else dict(checksums)
    if path.is_file():
        if real and archive_md5 is None:
            archive_md5 = CIFAR100_ARCHIVE_MD5
        members = _read_members_from_tarball(path, checksums, archive_md5)
        where = str(path)
    elif path.is_dir():
        folder = path / CIFAR100_FOLDER if (path / CIFAR100_FOLDER).is_dir() else path
        members = _read_members_from_folder(folder, checksums)
        where = str(folder)
    else:
        what = "is neither a folder nor a file" if path.exists() else "does not exist"
        raise DataError(
            f"data_dir={str(path)!r} {what}: give the extracted '{CIFAR100_FOLDER}/' folder, its parent, "
            f"or the '{CIFAR100_ARCHIVE}' archive."
        )
    meta = _unpickle("meta", members["meta"], where)
    if b"fine_label_names" not in meta:
        raise DataError(f"CIFAR-100 file 'meta' in {where} has no key b'fine_label_names'.")
    num_classes = len(meta[b"fine_label_names"])
    x_train, y_train = _split_arrays("train", _unpickle("train", members["train"], where), where)
    x_test, y_test = _split_arrays("test", _unpickle("test", members["test"], where), where)
    for split, y in (("train", y_train), ("test", y_test)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"CIFAR-100 file {split!r} in {where} has labels outside [0, {num_classes}).")
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes)


def download_cifar100(
    cache_dir=None, *, url: str = CIFAR100_URL, archive_md5: str | None = CIFAR100_ARCHIVE_MD5
) -> Path:
    """The path of the CIFAR-100 archive in ``cache_dir``, downloading it first if needed.

    The download goes to a ``.part`` file that is checked against
    ``archive_md5`` and only then renamed, so an interrupted download never
    leaves a file that looks complete.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / CIFAR100_ARCHIVE
    if target.is_file():
        return target
    _download(
        url,
        target,
        archive_md5,
        f"Download {CIFAR100_ARCHIVE} by hand and pass --data-dir PATH (the archive or the extracted folder).",
    )
    return target


def _download(url: str, target: Path, md5: str | None, hint: str) -> None:
    """Download ``url`` to ``target`` with ``keras.utils.get_file`` (progress bar, MD5 check), through a ``.part``
    file renamed only once the download is complete and its MD5 (when given) matches.

    The ``.part`` file and the rename stay here: ``get_file`` writes straight to the name it is given and, when
    the hash does not match, leaves the bad file there, so a download cut short by ``kill -9`` or a corrupt one
    would otherwise sit in the cache under the name that marks a good file. ``force_download`` because a
    ``.part`` left by a killed run must never be taken for the file (``get_file`` trusts an existing file
    when no hash is given). Failures are a :class:`DataError` ending with ``hint`` (what to do instead).
    """
    from keras.utils import get_file

    part = target.with_name(target.name + ".part")
    # Absolute: with a relative folder get_file falls back to /tmp/.keras when the folder is not writable.
    folder = str(part.parent.resolve())
    try:
        got = get_file(
            fname=part.name,
            origin=url,
            file_hash=md5,
            hash_algorithm="md5",
            cache_dir=folder,
            cache_subdir=folder,
            force_download=True,
        )
    except Exception as e:  # noqa: BLE001 - get_file re-raises a failed fetch as a bare Exception
        corrupt = md5 is not None and isinstance(e, ValueError) and part.is_file()
        got = md5sum(part) if corrupt else None
        part.unlink(missing_ok=True)
        if corrupt:
            raise DataError(f"The download from {url} is truncated or corrupt: MD5 {got}, expected {md5}.") from e
        raise DataError(f"Could not download {target.name} from {url} ({e!r}). {hint}") from e
    Path(got).replace(target)


# ------------------------------------------------------------------------ digits
def load_digits(test_per_class: int = 50) -> Dataset:
    """scikit-learn's handwritten digits as 8x8x1 ``uint8`` images, fixed stratified split."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test[rng.choice(idx, size=test_per_class, replace=False)] = True
    return Dataset("digits", images[~test], labels[~test], images[test], labels[test], 10)


# ----------------------------------------------------------------- Fashion-MNIST
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"
#: The four official files: split -> (file stem, IDX dimensions, MD5 of the official ``.gz``,
#: MD5 of the decompressed contents). Sums from the dataset's README (``.gz``) and of the decompressed files.
FASHION_MNIST_FILES = {
    "train_images": (
        "train-images-idx3-ubyte",
        (60000, 28, 28),
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ),
    "train_labels": (
        "train-labels-idx1-ubyte",
        (60000,),
        "25c81989df183df01b3e8a0aad5dffbe",
        "9018921c3c673c538a1fc5bad174d6f9",
    ),
    "test_images": (
        "t10k-images-idx3-ubyte",
        (10000, 28, 28),
        "bef4ecab320f06d8554ea6380940ec79",
        "8181f5470baa50b63fa0f6fddb340f0a",
    ),
    "test_labels": (
        "t10k-labels-idx1-ubyte",
        (10000,),
        "bb300cfdad3c16e7a12a480ee83cd310",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
}


def write_idx(path, array: np.ndarray, *, compress: bool | None = None) -> str:
    """Write ``array`` (``uint8``) as an IDX file (gzip-compressed when ``path`` ends in ``.gz``).

    The format: 2 zero bytes, the type code ``0x08`` (unsigned byte), the
    number of dimensions, each dimension as a big-endian int32, then the data
    row-major. Returns the MD5 of the decompressed contents.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape) + array.tobytes()
    path = Path(path)
    if compress if compress is not None else path.suffix == ".gz":
        path.write_bytes(gzip.compress(raw, mtime=0))
    else:
        path.write_bytes(raw)
    return md5sum(raw)


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, ValueError) as e:
            raise DataError(f"IDX file {path} is a truncated or corrupt gzip file ({e!r}).") from e
    return data


def read_idx(path, shape: tuple[int, ...] | None = None, md5: str | None = None) -> np.ndarray:
    """The ``uint8`` array of the IDX file ``path`` (gzip or raw), checked.

    Checks, in order, each failing with a :class:`DataError` naming the file:
    the magic number (unsigned bytes, 1 to 4 dimensions), the size implied by
    the header, the expected ``shape`` (when given) and the MD5 of the
    decompressed contents (when given).
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(
            f"IDX file {path} has the wrong magic number {raw[:4].hex() or '(empty file)'}: expected "
            f"00 00 08 0N (unsigned bytes, N dimensions). Is it an IDX file?"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header.")
    dims = struct.unpack(">" + "i" * ndim, raw[4:header])
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise DataError(
            f"IDX file {path} is truncated or has trailing data: {len(raw)} bytes, expected "
            f"{header + size} for dimensions {dims}."
        )
    if shape is not None and tuple(dims) != tuple(shape):
        raise DataError(f"IDX file {path} has dimensions {dims}, expected {tuple(shape)}.")
    if md5 is not None:
        got = md5sum(raw)
        if got != md5:
            raise DataError(
                f"IDX file {path} is corrupt: the MD5 of its decompressed contents is {got}, expected "
                f"{md5}. Delete it and get the file again."
            )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def debian_fashion_mnist_dir(package: str = FASHION_MNIST_DEBIAN_PACKAGE) -> Path | None:
    """The folder where the Debian package ``package`` installed the IDX files, or None.

    Asked of ``dpkg -L`` at run time (no path is guessed); None when dpkg is
    missing, the package is not installed, or it lists no training images.
    """
    try:
        res = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    stem = FASHION_MNIST_FILES["train_images"][0]
    for line in res.stdout.splitlines():
        p = Path(line.strip())
        if p.name in (stem, stem + ".gz") and p.is_file():
            return p.parent
    return None


def load_fashion_mnist(
    folder,
    *,
    checksums: dict[str, str | None] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    name: str = "fashion_mnist",
) -> Dataset:
    """Fashion-MNIST from the four IDX files in ``folder`` (``.gz`` or decompressed), checked.

    ``checksums`` maps each key of :data:`FASHION_MNIST_FILES` to the MD5 of
    its decompressed contents and ``shapes`` to its dimensions (the real
    dataset's by default; tests pass those of the small files they write).
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(
            f"data_dir={str(folder)!r} {what}: give the folder holding the four Fashion-MNIST "
            f"IDX files ({', '.join(f[0] + '.gz' for f in FASHION_MNIST_FILES.values())})."
        )
    arrays = {}
    for key, (stem, shape, _gz_md5, raw_md5) in FASHION_MNIST_FILES.items():
        path = _find_idx(folder, stem)
        if path is None:
            raise DataError(f"Fashion-MNIST file {stem}(.gz) is missing from {folder}.")
        md5 = raw_md5 if checksums is None else checksums.get(key)
        want = shape if shapes is None else shapes.get(key)
        arrays[key] = read_idx(path, want, md5)
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DataError(f"Fashion-MNIST {split} split in {folder}: {n_img} images but {n_lab} labels.")
        if arrays[f"{split}_labels"].max(initial=0) > 9:
            raise DataError(f"Fashion-MNIST {split} labels in {folder} are outside [0, 10).")
    return Dataset(
        name,
        arrays["train_images"][..., None].copy(),
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][..., None].copy(),
        arrays["test_labels"].astype(np.int64),
        10,
    )


def download_fashion_mnist(cache_dir=None, *, url: str = FASHION_MNIST_URL, check: bool = True) -> Path:
    """The cache folder ``<cache>/fashion-mnist`` with the four official ``.gz`` files, downloading missing ones.

    Each download goes to a ``.part`` file, is checked against the official
    MD5 of the ``.gz`` (when ``check``), and only then renamed.
    """
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for stem, _shape, gz_md5, _raw in FASHION_MNIST_FILES.values():
        target = folder / (stem + ".gz")
        if target.is_file():
            continue
        _download(
            url.rstrip("/") + "/" + stem + ".gz",
            target,
            gz_md5 if check else None,
            f"Install Fashion-MNIST with `apt-get install {FASHION_MNIST_DEBIAN_PACKAGE}`, or download the "
            f"four files by hand and pass --data-dir PATH.",
        )
    return folder


def _fashion_source(data_dir, cache: Path, download: bool) -> Path:
    if data_dir:
        return Path(data_dir)
    debian = debian_fashion_mnist_dir()
    if debian is not None:
        return debian
    cached = cache / "fashion-mnist"
    if cached.is_dir() and all(_find_idx(cached, f[0]) for f in FASHION_MNIST_FILES.values()):
        return cached
    if not download:
        raise DataError(
            f"Fashion-MNIST is not installed (`apt-get install {FASHION_MNIST_DEBIAN_PACKAGE}`) nor in "
            f"{cached}, and downloading is off; pass --data-dir PATH."
        )
    return download_fashion_mnist(cache)


# ------------------------------------------------------------- validation split
def with_validation_split(ds: Dataset, val_examples: int, seed: int = 0) -> Dataset:
    """``ds`` with ``val_examples`` training examples moved to a validation split (stratified, fixed).

    Each class gives the same share (rounded, adjusted to the exact total),
    drawn with ``default_rng(seed)``; the training split keeps its order
    otherwise. ``val_examples == 0`` returns ``ds`` unchanged.
    """
    if val_examples == 0:
        return ds
    n = len(ds.y_train)
    if not 0 < val_examples < n:
        raise DataError(
            f"val_examples={val_examples} must be in [0, {n}) for dataset {ds.name!r} ({n} training examples)."
        )
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(ds.y_train, return_counts=True)
    share = np.floor(counts / n * val_examples).astype(int)
    order = np.argsort(-(counts / n * val_examples - share), kind="stable")
    share[order[: val_examples - share.sum()]] += 1
    val = np.zeros(n, dtype=bool)
    for c, k in zip(classes, share):
        val[rng.choice(np.flatnonzero(ds.y_train == c), size=int(k), replace=False)] = True
    return dataclasses.replace(
        ds, x_train=ds.x_train[~val], y_train=ds.y_train[~val], x_val=ds.x_train[val], y_val=ds.y_train[val]
    )


# --------------------------------------------------------------------- synthetic
def write_synthetic_cifar100(
    root,
    *,
    num_train: int = 512,
    num_test: int = 256,
    num_classes: int = 10,
    seed: int = 0,
    noise: float = 48.0,
    tarball: bool = False,
) -> dict[str, str]:
    """Write a small dataset in the exact CIFAR-100 python format under ``root``.

    Writes ``root/cifar-100-python/{train,test,meta}`` (and, with ``tarball``,
    ``root/cifar-100-python.tar.gz`` holding them) plus ``root/checksums.json``;
    returns the MD5 of each file (``train``, ``test``, ``meta``, and
    ``archive`` with ``tarball``). Labels are ``fine_labels`` in
    ``[0, num_classes)``; ``coarse_labels`` are ``fine // 5`` like CIFAR-100's
    20 superclasses of 5 classes.
    """
    for name, v in (("num_train", num_train), ("num_test", num_test), ("num_classes", num_classes)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {name}={v!r}.")
    root = Path(root)
    folder = root / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.uniform(40, 215, size=(num_classes, 3072))

    def split(n, label, offset):
        fine = (np.arange(n) + offset) % num_classes
        rng.shuffle(fine)
        data = np.clip(templates[fine] + rng.normal(0, noise, size=(n, 3072)), 0, 255).astype(np.uint8)
        return {
            b"filenames": [f"synthetic_{label}_{i:05d}.png".encode() for i in range(n)],
            b"batch_label": f"{label} batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"data": data,
        }

    files = {
        "train": split(num_train, "training", 0),
        "test": split(num_test, "testing", 0),
        "meta": {
            b"fine_label_names": [f"class_{c}".encode() for c in range(num_classes)],
            b"coarse_label_names": [f"superclass_{c}".encode() for c in range((num_classes + 4) // 5)],
        },
    }
    sums = {}
    for name, obj in files.items():
        data = pickle.dumps(obj, protocol=2)
        _replace_with(folder / name, data)
        sums[name] = md5sum(data)
    if tarball:
        archive = root / CIFAR100_ARCHIVE
        with tarfile.open(archive, "w:gz") as tar:
            for name in files:
                tar.add(folder / name, arcname=f"{CIFAR100_FOLDER}/{name}")
        sums["archive"] = md5sum(archive)
    _replace_with(root / "checksums.json", json.dumps(sums, indent=2).encode())
    return sums


def _replace_with(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file of this process and a rename: processes that write the
    same cache at once (the workers of a multiworker run) write the same bytes, and a reader never sees
    a file half written."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_synthetic(cache_dir, *, num_train=512, num_test=256, num_classes=10, seed=0) -> Dataset:
    """Write (once per size) and read back a synthetic CIFAR-100-format dataset with the real loader."""
    root = Path(cache_dir) / f"synthetic_{num_train}_{num_test}_{num_classes}_{seed}"
    sums_path = root / "checksums.json"
    if not sums_path.is_file():
        write_synthetic_cifar100(root, num_train=num_train, num_test=num_test, num_classes=num_classes, seed=seed)
    sums = json.loads(sums_path.read_text())
    ds = load_cifar100(root, checksums={k: sums[k] for k in ("train", "test", "meta")}, name="synthetic")
    return ds


# ---------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset: everything the configs, the CLI and the benchmarks need to know of it.

    ``image_shape``, ``num_classes`` and ``train_size`` (the full training
    split, before any validation split) are ``None`` when the config decides
    them (``synthetic``); :meth:`resolve` fills them from a config.
    """

    name: str
    description: str
    image_shape: tuple[int, int, int] | None
    num_classes: int | None
    train_size: int | None
    test_size: int | None
    uses_data_dir: bool
    load: Callable[..., Dataset]  # load(data_dir, cache: Path, download: bool, **synthetic_kw)

    def resolve(self, cfg) -> dict:
        """``{"image_shape", "num_classes", "train_size", "test_size"}`` for the config ``cfg``."""
        if self.name == "synthetic":
            return {
                "image_shape": (32, 32, 3),
                "num_classes": cfg.synthetic_classes,
                "train_size": cfg.synthetic_train,
                "test_size": cfg.synthetic_test,
            }
        return {
            "image_shape": self.image_shape,
            "num_classes": self.num_classes,
            "train_size": self.train_size,
            "test_size": self.test_size,
        }


def _load_cifar100_entry(data_dir, cache: Path, download: bool, **_):
    if data_dir:
        return load_cifar100(data_dir)
    for candidate in (cache / CIFAR100_FOLDER, cache / CIFAR100_ARCHIVE):
        if candidate.exists():
            return load_cifar100(candidate)
    if not download:
        raise DataError(f"CIFAR-100 is not in {cache} and downloading is off; pass --data-dir PATH.")
    return load_cifar100(download_cifar100(cache))


DATASETS: dict[str, DatasetSpec] = {
    "cifar100": DatasetSpec(
        "cifar100",
        "CIFAR-100, 32x32x3, 100 classes (downloaded once, MD5-checked)",
        (32, 32, 3),
        100,
        50000,
        10000,
        True,
        _load_cifar100_entry,
    ),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist",
        "Fashion-MNIST, 28x28x1, 10 classes (Debian package, --data-dir or download; MD5-checked)",
        (28, 28, 1),
        10,
        60000,
        10000,
        True,
        lambda data_dir, cache, download, **_: load_fashion_mnist(_fashion_source(data_dir, cache, download)),
    ),
    "digits": DatasetSpec(
        "digits",
        "scikit-learn's 8x8 handwritten digits, 10 classes (offline)",
        (8, 8, 1),
        10,
        1297,
        500,
        False,
        lambda data_dir, cache, download, **_: load_digits(),
    ),
    "synthetic": DatasetSpec(
        "synthetic",
        "small synthetic files in the CIFAR-100 format (CI)",
        None,
        None,
        None,
        None,
        False,
        lambda data_dir, cache, download, **kw: load_synthetic(cache, **kw),
    ),
}


def load_dataset(
    name: str, *, data_dir=None, cache_dir=None, download: bool = True, val_examples: int = 0, **synthetic_kw
) -> Dataset:
    """The dataset ``name`` (a key of :data:`DATASETS`), with ``val_examples`` held out for validation."""
    spec = DATASETS.get(name)
    if spec is None:
        raise DataError(f"Unknown dataset={name!r}; expected one of {tuple(DATASETS)}.")
    if data_dir and not spec.uses_data_dir:
        raise DataError(
            f"data_dir={str(data_dir)!r} is not used by dataset={name!r} (only by "
            f"{tuple(n for n, s in DATASETS.items() if s.uses_data_dir)})."
        )
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return with_validation_split(spec.load(data_dir, cache, download, **synthetic_kw), val_examples)


# -------------------------------------------------------------------- data order
@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``epoch``'s examples (read-only; kept for the steps of the epoch rather than drawn again)."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the training batch at ``step``: a pure function of ``(seed, step)``.

    The examples form an endless stream of epochs, each a fresh permutation
    drawn from ``default_rng([seed, epoch])``; batch ``t`` is positions
    ``[t * batch_size, (t + 1) * batch_size)`` of that stream. A resumed run
    therefore sees exactly the batches of an uninterrupted one.
    """
    if batch_size < 1 or num_examples < 1:
        raise ValueError(f"batch_size={batch_size} and num_examples={num_examples} must be >= 1.")
    start = step * batch_size
    out = np.empty(batch_size, dtype=np.int64)
    filled = 0
    while filled < batch_size:
        epoch, offset = divmod(start + filled, num_examples)
        perm = _epoch_permutation(num_examples, seed, epoch)
        take = min(batch_size - filled, num_examples - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out


def noniid_batch_indices(
    labels: np.ndarray, *, labels_per_batch: int, per_label: int, seed: int, step: int
) -> np.ndarray:
    """A non-i.i.d. minibatch (paper, section 4.3): ``labels_per_batch`` labels, ``per_label`` images each.

    The labels are drawn with replacement among the classes present; for each
    draw, ``per_label`` distinct images of that label are drawn. The result
    is ordered label by label (the ``per_label`` images of one draw are
    consecutive). A pure function of ``(seed, step)``.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    by_class = {int(c): np.flatnonzero(labels == c) for c in classes}
    small = [c for c, idx in by_class.items() if len(idx) < per_label]
    if small:
        raise ValueError(f"per_label={per_label} exceeds the number of examples of classes {small[:5]}.")
    rng = np.random.default_rng([seed, step, 7])
    drawn = rng.choice(classes, size=labels_per_batch, replace=True)
    return np.concatenate([rng.choice(by_class[int(c)], size=per_label, replace=False) for c in drawn])


def split_pairs_order(indices: np.ndarray, labels_per_batch: int, per_label: int, groups: int) -> np.ndarray:
    """Reorder a label-by-label batch so that its ``groups`` consecutive parts split every label's images.

    ``indices`` is ordered as :func:`noniid_batch_indices` returns it (the
    ``per_label`` images of each draw consecutive). Image ``j`` of every draw
    goes to part ``j % groups``; each part holds ``per_label / groups`` images
    of every draw, draw by draw. With 16 x 2 and ``groups = 2``: the first half
    holds the first image of each pair, the second half the second one, so batch
    norm applied to each half (``microbatch_size = 16``) never sees both images of
    a pair together (the paper's section 4.3). The set of indices is unchanged.
    """
    indices = np.asarray(indices)
    if indices.shape != (labels_per_batch * per_label,):
        raise ValueError(
            f"indices of shape {indices.shape} are not a batch of labels_per_batch x per_label = "
            f"{labels_per_batch} x {per_label}."
        )
    if groups < 1 or per_label % groups:
        raise ValueError(f"groups={groups} must divide per_label={per_label}.")
    # (draw, image) -> (image % groups, draw, image // groups): part, then draw, then the draw's images in the part.
    grid = indices.reshape(labels_per_batch, per_label // groups, groups)
    return np.ascontiguousarray(grid.transpose(2, 0, 1)).reshape(-1)
