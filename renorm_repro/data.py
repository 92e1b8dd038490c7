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
- ``synthetic``: :func:`write_synthetic_cifar100` writes small files in the
  exact CIFAR-100 python format, which are then read by the real loader (with
  the checksums of the files written). Each class has a fixed random 32x32x3
  template; an image is ``template + noise``, so the class is learnable.

The data order of training (:func:`batch_indices`) is a pure function of
``(seed, step)``, so a resumed run sees exactly the batches it would have seen.
The non-i.i.d. sampler of the paper's section 4.3 is :func:`noniid_batch_indices`;
:func:`split_pairs_order` arranges its batches so that consecutive groups split the pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path
from typing import Dict, Optional

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
DATASETS = ("cifar100", "digits", "synthetic")


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
def _check_md5(name: str, data: bytes, expected: Optional[str], where: str) -> None:
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


def _read_members_from_folder(folder: Path, checksums: Dict[str, Optional[str]]) -> Dict[str, bytes]:
    out = {}
    for name, expected in checksums.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"CIFAR-100 file {name!r} is missing from {folder} (expected {path}).")
        data = path.read_bytes()
        _check_md5(name, data, expected, str(folder))
        out[name] = data
    return out


def _read_members_from_tarball(archive: Path, checksums, archive_md5: Optional[str]) -> Dict[str, bytes]:
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
    checksums: Optional[Dict[str, Optional[str]]] = None,
    archive_md5: Optional[str] = None,
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
        raise DataError(
            f"data_dir={str(path)!r} does not exist: give the extracted '{CIFAR100_FOLDER}/' folder, its parent, "
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
    cache_dir=None, *, url: str = CIFAR100_URL, archive_md5: Optional[str] = CIFAR100_ARCHIVE_MD5
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
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url) as response, open(part, "wb") as f:  # noqa: S310 - user-chosen URL
            total = int(response.headers.get("Content-Length") or 0)
            bar = _progress(total, f"downloading {url}")
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
            bar.close()
    except OSError as e:
        part.unlink(missing_ok=True)
        raise DataError(
            f"Could not download CIFAR-100 from {url} ({e!r}). Download {CIFAR100_ARCHIVE} by hand and pass "
            f"--data-dir PATH (the archive or the extracted folder)."
        ) from e
    if archive_md5 is not None:
        got = md5sum(part)
        if got != archive_md5:
            part.unlink(missing_ok=True)
            raise DataError(f"The download from {url} is truncated or corrupt: MD5 {got}, expected {archive_md5}.")
    part.replace(target)
    return target


def _progress(total, desc):
    try:
        from tqdm import tqdm

        return tqdm(total=total or None, unit="B", unit_scale=True, desc=desc, leave=False)
    except ImportError:  # pragma: no cover - tqdm is in the repro extra
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Null()


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
) -> Dict[str, str]:
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
        (folder / name).write_bytes(data)
        sums[name] = md5sum(data)
    if tarball:
        archive = root / CIFAR100_ARCHIVE
        with tarfile.open(archive, "w:gz") as tar:
            for name in files:
                tar.add(folder / name, arcname=f"{CIFAR100_FOLDER}/{name}")
        sums["archive"] = md5sum(archive)
    (root / "checksums.json").write_text(json.dumps(sums, indent=2))
    return sums


def load_synthetic(cache_dir, *, num_train=512, num_test=256, num_classes=10, seed=0) -> Dataset:
    """Write (once per size) and read back a synthetic CIFAR-100-format dataset with the real loader."""
    root = Path(cache_dir) / f"synthetic_{num_train}_{num_test}_{num_classes}_{seed}"
    sums_path = root / "checksums.json"
    if not sums_path.is_file():
        write_synthetic_cifar100(root, num_train=num_train, num_test=num_test, num_classes=num_classes, seed=seed)
    sums = json.loads(sums_path.read_text())
    ds = load_cifar100(root, checksums={k: sums[k] for k in ("train", "test", "meta")}, name="synthetic")
    return ds


def load_dataset(name: str, *, data_dir=None, cache_dir=None, download: bool = True, **synthetic_kw) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name == "cifar100":
        if data_dir:
            return load_cifar100(data_dir)
        for candidate in (cache / CIFAR100_FOLDER, cache / CIFAR100_ARCHIVE):
            if candidate.exists():
                return load_cifar100(candidate)
        if not download:
            raise DataError(f"CIFAR-100 is not in {cache} and downloading is off; pass --data-dir PATH.")
        return load_cifar100(download_cifar100(cache))
    if data_dir:
        raise DataError(f"data_dir={str(data_dir)!r} is only used by dataset='cifar100', got dataset={name!r}.")
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return load_synthetic(cache, **synthetic_kw)
    raise DataError(f"Unknown dataset={name!r}; expected one of {DATASETS}.")


# -------------------------------------------------------------------- data order
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
        perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
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
        raise ValueError(f"indices of shape {indices.shape} are not a batch of labels_per_batch x per_label = "
                         f"{labels_per_batch} x {per_label}.")
    if groups < 1 or per_label % groups:
        raise ValueError(f"groups={groups} must divide per_label={per_label}.")
    # (draw, image) -> (image % groups, draw, image // groups): part, then draw, then the draw's images in the part.
    grid = indices.reshape(labels_per_batch, per_label // groups, groups)
    return np.ascontiguousarray(grid.transpose(2, 0, 1)).reshape(-1)
