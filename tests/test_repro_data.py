"""renorm_repro.data: the CIFAR-100 loader on format-exact files, MD5 failures, digits, data order."""

import json
import pickle

import numpy as np
import pytest

from renorm_repro import data as D


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    sums = D.write_synthetic_cifar100(root, num_train=40, num_test=20, num_classes=5, seed=3, tarball=True)
    return root, sums


def _checks(sums):
    return {k: sums[k] for k in ("train", "test", "meta")}


def test_synthetic_files_are_in_the_exact_cifar100_format(synth):
    root, _ = synth
    folder = root / "cifar-100-python"
    with open(folder / "train", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert set(d) == {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (40, 3072)
    assert all(isinstance(v, int) for v in d[b"fine_labels"])
    assert d[b"coarse_labels"] == [v // 5 for v in d[b"fine_labels"]]
    with open(folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert len(meta[b"fine_label_names"]) == 5 and b"coarse_label_names" in meta


@pytest.mark.parametrize("where", ["folder", "parent", "tarball"])
def test_loader_reads_folder_parent_and_tarball_identically(synth, where):
    root, sums = synth
    path = {"folder": root / "cifar-100-python", "parent": root, "tarball": root / D.CIFAR100_ARCHIVE}[where]
    ds = D.load_cifar100(path, checksums=_checks(sums), archive_md5=sums["archive"])
    assert ds.x_train.shape == (40, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (20, 32, 32, 3) and ds.num_classes == 5
    # CHW rows -> HWC images: pixel (0, 1) of channel c is data[c * 1024 + 1].
    raw = pickle.loads((root / "cifar-100-python" / "train").read_bytes(), encoding="bytes")
    np.testing.assert_array_equal(ds.x_train[0, 0, 1], raw[b"data"][0, [1, 1025, 2049]])
    np.testing.assert_array_equal(ds.y_train, raw[b"fine_labels"])


def test_truncated_file_fails_md5_with_a_clear_message(synth, tmp_path):
    root, sums = synth
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes((root / "cifar-100-python" / name).read_bytes())
    full = (folder / "train").read_bytes()
    (folder / "train").write_bytes(full[: len(full) // 2])
    with pytest.raises(D.DataError, match=r"'train'.*truncated or corrupt.*MD5.*expected " + sums["train"]):
        D.load_cifar100(folder, checksums=_checks(sums))


def test_real_checksums_reject_files_that_are_not_cifar100(synth):
    root, _ = synth
    with pytest.raises(D.DataError, match="truncated or corrupt.*expected " + D.CIFAR100_MD5["train"]):
        D.load_cifar100(root)  # the published sums: the synthetic files do not match


def test_truncated_tarball_is_an_error(synth, tmp_path):
    root, sums = synth
    data = (root / D.CIFAR100_ARCHIVE).read_bytes()
    bad = tmp_path / D.CIFAR100_ARCHIVE
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(D.DataError, match="archive .* truncated or corrupt: its MD5"):
        D.load_cifar100(bad, checksums=_checks(sums), archive_md5=sums["archive"])
    with pytest.raises(D.DataError, match="truncated or corrupt"):  # no archive sum: the tar reader fails
        D.load_cifar100(bad, checksums=_checks(sums))


def test_missing_member_and_missing_path(synth, tmp_path):
    root, sums = synth
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "meta").write_bytes((root / "cifar-100-python" / "meta").read_bytes())
    with pytest.raises(D.DataError, match="'train' is missing"):
        D.load_cifar100(folder, checksums=_checks(sums))
    with pytest.raises(D.DataError, match="data_dir='.*nowhere' does not exist"):
        D.load_cifar100(tmp_path / "nowhere")


def test_download_checks_md5_and_caches(synth, tmp_path):
    root, sums = synth
    url = (root / D.CIFAR100_ARCHIVE).as_uri()
    path = D.download_cifar100(tmp_path / "cache", url=url, archive_md5=sums["archive"])
    assert path.read_bytes() == (root / D.CIFAR100_ARCHIVE).read_bytes()
    ds = D.load_cifar100(path, checksums=_checks(sums), archive_md5=sums["archive"])
    assert len(ds.y_train) == 40
    with pytest.raises(D.DataError, match="truncated or corrupt: MD5"):
        D.download_cifar100(tmp_path / "cache2", url=url, archive_md5="0" * 32)
    assert not any((tmp_path / "cache2").iterdir())  # no partial file left behind
    with pytest.raises(D.DataError, match="Could not download"):
        D.download_cifar100(tmp_path / "cache3", url=(tmp_path / "absent.tar.gz").as_uri())


def test_load_dataset_errors():
    with pytest.raises(D.DataError, match="Unknown dataset='mnist'"):
        D.load_dataset("mnist")
    with pytest.raises(D.DataError, match="not used by dataset='digits'"):
        D.load_dataset("digits", data_dir="/tmp")


def test_digits_split_is_fixed_stratified_and_rescaled():
    ds = D.load_digits()
    assert ds.x_train.shape == (1297, 8, 8, 1) and ds.x_test.shape == (500, 8, 8, 1)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255
    np.testing.assert_array_equal(np.bincount(ds.y_test), [50] * 10)
    np.testing.assert_array_equal(D.load_digits().x_test, ds.x_test)


def test_synthetic_loader_uses_the_real_loader_and_is_learnable(tmp_path):
    ds = D.load_synthetic(tmp_path, num_train=200, num_test=100, num_classes=4)
    assert json.loads((tmp_path / "synthetic_200_100_4_0" / "checksums.json").read_text())["train"]
    # Nearest class mean on the training set classifies the test set well: the signal is learnable.
    means = np.stack([ds.x_train[ds.y_train == c].reshape(-1, 3072).mean(0) for c in range(4)])
    dist = ((ds.x_test.reshape(-1, 1, 3072).astype(float) - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == ds.y_test).mean() > 0.9


def test_batch_indices_are_a_pure_function_of_seed_and_step():
    n, b = 10, 4
    stream = np.concatenate([D.batch_indices(n, b, seed=5, step=t) for t in range(5)])
    # Each epoch (10 consecutive positions) is a permutation.
    for e in range(2):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    np.testing.assert_array_equal(D.batch_indices(n, b, 5, 3), stream[12:16])
    assert not np.array_equal(D.batch_indices(n, b, 6, 0), D.batch_indices(n, b, 5, 0))


def test_noniid_sampler_label_structure():
    labels = np.repeat(np.arange(10), 20)
    for step in range(5):
        idx = D.noniid_batch_indices(labels, labels_per_batch=16, per_label=2, seed=0, step=step)
        assert idx.shape == (32,)
        pairs = labels[idx].reshape(16, 2)
        assert (pairs[:, 0] == pairs[:, 1]).all()  # 2 images of the same label, consecutive
        assert (idx.reshape(16, 2)[:, 0] != idx.reshape(16, 2)[:, 1]).all()  # distinct images
    a = D.noniid_batch_indices(labels, labels_per_batch=16, per_label=2, seed=0, step=1)
    np.testing.assert_array_equal(a, D.noniid_batch_indices(labels, labels_per_batch=16, per_label=2, seed=0, step=1))
    with pytest.raises(ValueError, match="per_label=30 exceeds"):
        D.noniid_batch_indices(labels, labels_per_batch=2, per_label=30, seed=0, step=0)
