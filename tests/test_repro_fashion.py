"""The Fashion-MNIST study's pipeline: IDX files, the dataset registry, the validation split,
learning-rate schedules, Keras's own renorm as an arm (against the NumPy oracle), the lag
diagnostic, and the statistics of the report (intervals, paired differences)."""

import gzip
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from renorm_repro import data as D
from renorm_repro.config import ConfigError, get_config, preset_names
from renorm_repro.runs import EXTRA_METRIC_COLUMNS, METRIC_COLUMNS, RunDirError, metric_columns, read_metrics
from renorm_repro.stats import mean_ci, paired_difference, t_quantile_975

SMALL = {"train_images": (60, 28, 28), "train_labels": (60,), "test_images": (20, 28, 28), "test_labels": (20,)}


def write_small_fashion(folder, *, gz=True, seed=0):
    """Four format-exact IDX files of a 60/20 dataset of 10 classes; returns {key: MD5 of the contents}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sums = {}
    for key, shape in SMALL.items():
        stem = D.FASHION_MNIST_FILES[key][0]
        if key.endswith("labels"):
            arr = (np.arange(shape[0]) % 10).astype(np.uint8)
        else:
            labels = np.arange(shape[0]) % 10
            arr = np.clip(labels[:, None, None] * 25 + rng.integers(0, 20, shape), 0, 255).astype(np.uint8)
        sums[key] = D.write_idx(folder / (stem + (".gz" if gz else "")), arr)
    return sums


# ------------------------------------------------------------------ IDX files
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arr = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    path = tmp_path / ("a.gz" if gz else "a")
    md5 = D.write_idx(path, arr)
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3]) and raw[4:16] == bytes([0, 0, 0, 5, 0, 0, 0, 3, 0, 0, 0, 4])
    assert md5 == D.md5sum(raw)
    np.testing.assert_array_equal(D.read_idx(path, (5, 3, 4), md5), arr)


def test_idx_errors_name_the_file(tmp_path):
    arr = np.zeros((4, 2, 2), np.uint8)
    good = tmp_path / "good"
    md5 = D.write_idx(good, arr)
    raw = good.read_bytes()
    cases = {
        "magic": (bytes([0, 0, 9, 3]) + raw[4:], "wrong magic number"),
        "short": (raw[:-1], "truncated"),
        "long": (raw + b"\0", "trailing data"),
        "header": (raw[:6], "shorter than its"),
        "empty": (b"", "wrong magic number"),
        "badgz": (b"\x1f\x8b" + b"garbage", "corrupt gzip"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(D.DataError, match=msg) as e:
            D.read_idx(p)
        assert str(p) in str(e.value)
    with pytest.raises(D.DataError, match=r"dimensions \(4, 2, 2\), expected \(4, 2, 3\)"):
        D.read_idx(good, (4, 2, 3))
    with pytest.raises(D.DataError, match="corrupt: the MD5 of its decompressed contents") as e:
        D.read_idx(good, None, "0" * 32)
    assert str(good) in str(e.value) and md5 in str(e.value)


def test_load_fashion_mnist_small_files(tmp_path):
    for gz in (True, False):
        sums = write_small_fashion(tmp_path / f"f{gz}", gz=gz)
        ds = D.load_fashion_mnist(tmp_path / f"f{gz}", checksums=sums, shapes=SMALL)
        assert ds.x_train.shape == (60, 28, 28, 1) and ds.x_test.shape == (20, 28, 28, 1)
        assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.num_classes == 10
        np.testing.assert_array_equal(ds.y_train, np.arange(60) % 10)


def test_load_fashion_mnist_refuses_wrong_files(tmp_path):
    sums = write_small_fashion(tmp_path / "f")
    # The real dataset's dimensions and checksums: these small files are not it.
    with pytest.raises(D.DataError, match="train-images-idx3-ubyte.gz has dimensions"):
        D.load_fashion_mnist(tmp_path / "f")
    with pytest.raises(D.DataError, match="train-images-idx3-ubyte.gz is corrupt: the MD5"):
        D.load_fashion_mnist(tmp_path / "f", shapes=SMALL)
    (tmp_path / "f" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DataError, match="t10k-labels-idx1-ubyte.*is missing from"):
        D.load_fashion_mnist(tmp_path / "f", checksums=sums, shapes=SMALL)
    with pytest.raises(D.DataError, match="nowhere.* does not exist"):
        D.load_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(D.DataError, match="has dimensions"):
        D.load_dataset("fashion_mnist", data_dir=str(tmp_path / "f"))


def test_debian_folder_is_asked_of_dpkg(tmp_path, monkeypatch):
    write_small_fashion(tmp_path / "usr/share/datasets/fm")
    listing = "\n".join(
        ["/.", "/usr/share/doc/x/README.md.gz", str(tmp_path / "usr/share/datasets/fm/train-images-idx3-ubyte.gz")]
    )
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return SimpleNamespace(returncode=0, stdout=listing, stderr="")

    monkeypatch.setattr(D.subprocess, "run", fake_run)
    assert D.debian_fashion_mnist_dir() == tmp_path / "usr/share/datasets/fm"
    assert calls == [["dpkg", "-L", "dataset-fashion-mnist"]]
    monkeypatch.setattr(D.subprocess, "run", lambda cmd, **kw: SimpleNamespace(returncode=1, stdout="", stderr="x"))
    assert D.debian_fashion_mnist_dir() is None

    def missing(cmd, **kw):
        raise FileNotFoundError("dpkg")

    monkeypatch.setattr(D.subprocess, "run", missing)
    assert D.debian_fashion_mnist_dir() is None


def test_source_order_data_dir_then_debian_then_cache_then_download(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "debian_fashion_mnist_dir", lambda: tmp_path / "debian")
    assert D._fashion_source(str(tmp_path / "mine"), tmp_path / "cache", True) == tmp_path / "mine"
    assert D._fashion_source(None, tmp_path / "cache", True) == tmp_path / "debian"
    monkeypatch.setattr(D, "debian_fashion_mnist_dir", lambda: None)
    write_small_fashion(tmp_path / "cache" / "fashion-mnist")
    assert D._fashion_source(None, tmp_path / "cache", False) == tmp_path / "cache" / "fashion-mnist"
    with pytest.raises(D.DataError, match="downloading is off"):
        D._fashion_source(None, tmp_path / "empty", False)


def test_download_over_file_url(tmp_path):
    write_small_fashion(tmp_path / "mirror")
    url = (tmp_path / "mirror").as_uri()
    # The official .gz checksums: these files are not the official ones, and nothing is kept.
    with pytest.raises(D.DataError, match="truncated or corrupt: MD5"):
        D.download_fashion_mnist(tmp_path / "c1", url=url)
    assert not any((tmp_path / "c1" / "fashion-mnist").iterdir())
    folder = D.download_fashion_mnist(tmp_path / "c2", url=url, check=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f[0] + ".gz" for f in D.FASHION_MNIST_FILES.values())
    with pytest.raises(
        D.DataError, match="Could not download train-images-idx3-ubyte.gz from .*apt-get install dataset-fashion-mnist"
    ):
        D.download_fashion_mnist(tmp_path / "c3", url=(tmp_path / "absent").as_uri())


def _debian_installed():
    try:
        return D.debian_fashion_mnist_dir() is not None
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _debian_installed(), reason="dataset-fashion-mnist (Debian) is not installed")
def test_real_fashion_mnist_from_debian():
    ds = D.load_dataset("fashion_mnist", val_examples=5000)
    assert ds.summary() == {
        "name": "fashion_mnist",
        "train": 55000,
        "test": 10000,
        "validation": 5000,
        "image_shape": [28, 28, 1],
        "num_classes": 10,
    }
    np.testing.assert_array_equal(np.bincount(ds.y_val), [500] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)


# ---------------------------------------------------------- registry and splits
def test_one_registry_entry_per_dataset():
    assert set(D.DATASETS) == {"cifar100", "fashion_mnist", "digits", "synthetic"}
    cfg = get_config("fashion", "microbatch")
    assert cfg.image_shape() == (28, 28, 1) and cfg.num_classes() == 10 and cfg.train_size() == 55000
    smoke = get_config("smoke", "microbatch")
    assert smoke.image_shape() == (32, 32, 3) and smoke.num_classes() == smoke.synthetic_classes
    with pytest.raises(ConfigError, match="`dataset` must be one of"):
        get_config("smoke", "microbatch", {"dataset": "mnist"})
    with pytest.raises(D.DataError, match="not used by dataset='digits'"):
        D.load_dataset("digits", data_dir="/tmp")


def test_validation_split_is_stratified_fixed_and_disjoint(tmp_path):
    sums = write_small_fashion(tmp_path / "f")
    ds = D.load_fashion_mnist(tmp_path / "f", checksums=sums, shapes=SMALL)
    ds = D.Dataset(ds.name, ds.x_train, ds.y_train, ds.x_test, ds.y_test, 10)
    split = D.with_validation_split(ds, 20)
    assert len(split.y_val) == 20 and len(split.y_train) == 40
    np.testing.assert_array_equal(np.bincount(split.y_val), [2] * 10)
    again = D.with_validation_split(ds, 20)
    np.testing.assert_array_equal(split.x_val, again.x_val)
    # Disjoint and complete: every training image is in exactly one of the two splits.
    flat = lambda x: {bytes(r) for r in x.reshape(len(x), -1)}  # noqa: E731
    assert flat(split.x_val).isdisjoint(flat(split.x_train))
    assert len(flat(split.x_val) | flat(split.x_train)) == len(flat(ds.x_train))
    assert D.with_validation_split(ds, 0) is ds
    odd = D.with_validation_split(ds, 13)
    assert len(odd.y_val) == 13 and np.bincount(odd.y_val, minlength=10).max() - np.bincount(odd.y_val).min() <= 1
    with pytest.raises(D.DataError, match="val_examples=60 must be in"):
        D.with_validation_split(ds, 60)


def test_config_checks_of_the_new_fields():
    for key, value, msg in [
        ("val_examples", "60000", "must be smaller than the 60000"),
        ("val_examples", "-1", "must be >= 0"),
        ("lr_schedule", "linear", "must be one of"),
        ("lr_decay_at", "0.8,0.5", "increasing fractions"),
        ("lr_decay_factor", "0", "must be in"),
        ("eval_lag_examples", "-3", "must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            get_config("fashion", "noniid", {key: value})
    assert "fashion" in preset_names()
    for exp in ("microbatch", "noniid", "iid"):
        cfg = get_config("fashion", exp)
        assert cfg.dataset == "fashion_mnist" and cfg.val_examples == 5000 and len(cfg.seeds) >= 5
        assert cfg.lr_schedule == "cosine" and cfg.eval_lag_examples > 0


def test_learning_rate_schedules():
    cfg = get_config("fashion", "noniid", {"steps": 1000, "learning_rate": 0.01})
    assert cfg.learning_rate_at(0) == pytest.approx(0.01)
    assert cfg.learning_rate_at(500) == pytest.approx(0.005)
    assert cfg.learning_rate_at(250) == pytest.approx(0.005 * (1 + math.cos(math.pi / 4)))
    assert cfg.learning_rate_at(1000) == pytest.approx(0.0, abs=1e-12)
    step = get_config(
        "fashion",
        "noniid",
        {
            "steps": 1000,
            "learning_rate": 0.01,
            "lr_schedule": "step",
            "lr_decay_at": "0.5,0.75",
            "lr_decay_factor": 0.1,
        },
    )
    got = [step.learning_rate_at(t) for t in (0, 499, 500, 749, 750, 999)]
    np.testing.assert_allclose(got, [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4], rtol=1e-12)
    const = get_config("fashion", "noniid", {"lr_schedule": "constant"})
    assert const.learning_rate_at(123) == const.learning_rate


def test_tensorflow_learning_rate_schedule_equals_the_config():
    import tensorflow as tf

    from renorm_repro.train import _learning_rate

    for kind in ("cosine", "step"):
        cfg = get_config("fashion", "noniid", {"steps": 1000, "lr_schedule": kind})
        sched = _learning_rate(cfg)
        for t in (0, 1, 250, 499, 500, 750, 999):
            assert float(sched(tf.constant(t, tf.int64))) == pytest.approx(cfg.learning_rate_at(t), rel=1e-6, abs=1e-9)
    assert _learning_rate(get_config("fashion", "noniid", {"lr_schedule": "constant"})) == 3e-3


# --------------------------------------------------------- Keras's renorm arm
def test_keras_renorm_arm_matches_the_oracle_through_the_schedule():
    """Keras's own renorm with the swapped-in schedule follows the NumPy oracle step by step (float64):
    outputs, gradients, moving statistics, clip diagnostics."""
    import tensorflow as tf

    from renorm.numpy_ref import BatchRenormReference
    from renorm.schedule import ClipSchedule
    from renorm_repro.keras_renorm import ScheduledKerasRenorm

    sched = ClipSchedule(rmax=2.0, dmax=1.0, warmup_steps=2, rmax_steps=6, dmax_steps=5)
    layer = ScheduledKerasRenorm(sched, momentum=0.6, epsilon=1e-3, dtype="float64")
    layer.build((None, 4, 4, 3))
    ref = BatchRenormReference(
        3, momentum=0.6, epsilon=1e-3, rmax=2.0, dmax=1.0, warmup_steps=2, rmax_steps=6, dmax_steps=5
    )
    rng = np.random.default_rng(0)
    clipped = []
    for t in range(9):
        # Drifting inputs: the moving statistics lag, so the clip bites once the ramp opens.
        x = rng.normal(3.0 * t, 1.0 + t, size=(8, 4, 4, 3))
        dy = rng.normal(size=x.shape)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * dy)
        dx, dgamma, dbeta = (g.numpy() for g in tape.gradient(loss, [xt, layer.gamma, layer.beta]))
        y_ref = ref.train(x)
        dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy)
        np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-12, atol=1e-12)
        # The gradients too (r and d constants, as the paper has them), so that training steps agree.
        for got, want in ((dx, dx_ref), (dgamma, dgamma_ref), (dbeta, dbeta_ref)):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
        np.testing.assert_allclose(layer.moving_mean.numpy(), ref.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.moving_stddev.numpy(), ref.stddev, rtol=1e-12, atol=1e-12)
        assert int(layer.step.numpy()) == ref.step == t + 1
        assert float(layer.r_clipped_fraction.numpy()) == pytest.approx(ref.r_clipped)
        assert float(layer.d_clipped_fraction.numpy()) == pytest.approx(ref.d_clipped)
        clipped.append(ref.r_clipped + ref.d_clipped)
    assert sum(clipped[3:]) > 0  # the schedule opened and the clip was exercised
    x = rng.normal(size=(5, 4, 4, 3))
    np.testing.assert_allclose(
        layer(tf.constant(x), training=False).numpy(), (x - ref.mean) / ref.stddev, rtol=1e-10, atol=1e-10
    )


def test_keras_arm_refuses_micro_batches():
    import dataclasses

    from renorm_repro.train import make_norm_layer

    cfg = get_config("fashion", "noniid")
    layer = make_norm_layer(cfg, "keras_brn", name="n")
    assert type(layer).__name__ == "ScheduledKerasRenorm" and layer.renorm and layer.renorm_momentum == cfg.momentum
    assert layer.renorm_clipping == {"rmax": 3.0, "rmin": 1 / 3.0, "dmax": 5.0}

    class Fake(type(cfg)):
        def arm_spec(self, arm):
            return dict(super().arm_spec(arm), microbatch_size=16)

    with pytest.raises(ValueError, match="whole minibatches only"):
        make_norm_layer(Fake(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}), "keras_brn")


# ------------------------------------------------------ end to end, small files
def test_small_fashion_run_logs_test_lag_and_learning_rate(tmp_path, monkeypatch):
    import dataclasses

    from renorm_repro.cli import run_experiment

    write_small_fashion(tmp_path / "fm")
    # The small files are not the real dataset: read them through the loader with their own sums.
    sums = {k: D.md5sum(D._read_maybe_gzip(tmp_path / "fm" / (D.FASHION_MNIST_FILES[k][0] + ".gz"))) for k in SMALL}
    small = dataclasses.replace(
        D.DATASETS["fashion_mnist"],
        load=lambda data_dir, cache, download, **_: D.load_fashion_mnist(data_dir, checksums=sums, shapes=SMALL),
    )
    monkeypatch.setitem(D.DATASETS, "fashion_mnist", small)
    cfg = get_config(
        "fashion",
        "noniid",
        {
            "data_dir": str(tmp_path / "fm"),
            "val_examples": 20,
            "arms": "bn,brn,keras_brn",
            "seeds": "0",
            "steps": 6,
            "eval_every": 3,
            "checkpoint_every": 3,
            "width": 2,
            "eval_train_examples": 16,
            "eval_lag_examples": 24,
            "labels_per_batch": 4,
            "per_label": 2,
            "batch_size": 8,
        },
    )
    report = run_experiment(cfg, tmp_path / "out", progress=False, log=lambda m: None)
    rows = {arm: read_metrics(tmp_path / "out" / "runs" / arm / "seed0" / "metrics.csv") for arm in cfg.arms}
    assert tuple(rows["bn"][0]) == metric_columns(cfg)
    for rs in rows.values():
        assert [r["step"] for r in rs] == [3, 6]
        for r in rs:
            assert all(math.isfinite(r[c]) and r[c] >= 0 for c in EXTRA_METRIC_COLUMNS["lag"])
            assert r["learning_rate"] == pytest.approx(cfg.learning_rate_at(r["step"] - 1))
            # 20 validation images and 20 test images: accuracies are multiples of 1/20.
            assert (r["val_accuracy"] * 20) % 1 == pytest.approx(0.0, abs=1e-9) or (
                r["val_accuracy"] * 20
            ) % 1 == pytest.approx(1.0, abs=1e-9)
    # Keras's renorm and ours: same seed, same batches, same maths (float32 rounding apart).
    for a, b in zip(rows["brn"], rows["keras_brn"]):
        for col in ("train_loss", "val_loss", "test_loss", "train_eval_loss", "lag_mean_norm2", "lag_std_norm4"):
            assert a[col] == pytest.approx(b[col], rel=1e-3, abs=1e-4), col
    agg = report["aggregate"]
    assert {(p["a"], p["b"]) for p in agg["paired"]} == {("bn", "brn"), ("brn", "keras_brn"), ("bn", "keras_brn")}
    assert "test_last4" in agg["arms"]["brn"]["scalars"]


# ------------------------------------------------------------------ statistics
def test_t_quantiles_are_scipys():
    from scipy import stats

    for df in (1, 4, 30, 31, 120, 1000):
        assert t_quantile_975(df) == stats.t.ppf(0.975, df)
    assert t_quantile_975(4) == pytest.approx(2.776445, abs=1e-6)  # a printed table's value
    with pytest.raises(ValueError, match="df=0"):
        t_quantile_975(0)


def test_mean_ci_and_paired_difference_by_hand():
    ci = mean_ci([0.80, 0.82, 0.84, 0.86, 0.88])
    # Deviations -0.04, -0.02, 0, 0.02, 0.04: sum of squares 0.004, sd sqrt(0.004 / 4); t(4) = 2.776445.
    assert ci["mean"] == pytest.approx(0.84) and ci["sd"] == pytest.approx(math.sqrt(0.004 / 4))
    assert ci["half_width"] == pytest.approx(2.776445 * math.sqrt(0.004 / 4) / math.sqrt(5))
    assert ci["lo"] == pytest.approx(0.84 - ci["half_width"]) and ci["hi"] == pytest.approx(0.84 + ci["half_width"])
    one = mean_ci([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["half_width"])
    a = {0: 0.80, 1: 0.70, 2: 0.90, 3: 0.60}
    b = {0: 0.81, 1: 0.72, 2: 0.90, 3: 0.63, 9: 0.1}
    p = paired_difference(a, b)
    assert p["seeds"] == [0, 1, 2, 3] and p["wins"] == 3
    np.testing.assert_allclose(p["differences"], [0.01, 0.02, 0.0, 0.03], atol=1e-12)
    assert p["mean"] == pytest.approx(0.015)
    # Pairing removes the spread both arms share: the paired interval is far narrower than either arm's.
    assert p["half_width"] < mean_ci(list(a.values()))["half_width"] / 5
    with pytest.raises(ValueError, match="No seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def _fake_experiment(root, cfg, finals):
    """An experiment folder whose runs' test accuracy is constant at ``finals[arm][seed]``."""
    from renorm_repro.config import config_to_dict

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"config": config_to_dict(cfg)}))
    cols = metric_columns(cfg)
    for arm, by_seed in finals.items():
        for seed, acc in by_seed.items():
            d = root / "runs" / arm / f"seed{seed}"
            d.mkdir(parents=True)
            lines = [",".join(cols)]
            for step in (100, 200, 300, 400, 500, 600):
                row = {c: 0.5 for c in cols}
                row.update(step=step, test_accuracy=acc, val_accuracy=acc - 0.01)
                lines.append(",".join(repr(row[c]) if c != "step" else str(step) for c in cols))
            (d / "metrics.csv").write_text("\n".join(lines) + "\n")
            if arm != "bn" or seed != 4:  # one unfinished run
                (d / "done.json").write_text("{}")


def test_report_intervals_and_paired_differences(tmp_path):
    from renorm_repro.report import aggregate, write_report

    cfg = get_config("fashion", "iid", {"arms": "bn,brn", "seeds": "0,1,2,3,4"})
    bn = {0: 0.80, 1: 0.82, 2: 0.84, 3: 0.86, 4: 0.50}
    brn = {0: 0.81, 1: 0.84, 2: 0.85, 3: 0.89, 4: 0.88}
    _fake_experiment(tmp_path / "x", cfg, {"bn": bn, "brn": brn})
    agg = aggregate(tmp_path / "x")
    s = agg["arms"]["bn"]["scalars"]["test_last4"]
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.83)  # the unfinished run (seed 4) is left out
    assert agg["arms"]["bn"]["seeds"] == [0, 1, 2, 3] and agg["arms"]["bn"]["unfinished_runs_left_out"] == [4]
    assert agg["arms"]["bn"]["final_accuracy_mean"] == pytest.approx(0.82)  # curves and tables too
    assert agg["arms"]["brn"]["scalars"]["test_final"]["mean"] == pytest.approx(np.mean(list(brn.values())))
    p = next(p for p in agg["paired"] if p["scalar"] == "test_last4")
    assert (p["a"], p["b"], p["seeds"], p["wins"]) == ("bn", "brn", [0, 1, 2, 3], 4)
    assert p["mean"] == pytest.approx(np.mean([0.01, 0.02, 0.01, 0.03]))
    text = write_report(tmp_path / "x")["summary"]
    assert "## Paired differences" in text and "Batch Renorm - Batch Norm" in text
    assert "Unfinished runs left out (their arm has complete runs): Batch Norm: seed 4." in text
    assert f"{p['mean'] * 100:.2f} [{p['lo'] * 100:.2f}, {p['hi'] * 100:.2f}], 4/4" in text


def test_old_and_new_metric_layouts_are_read(tmp_path):
    for cols in (
        METRIC_COLUMNS,
        METRIC_COLUMNS + EXTRA_METRIC_COLUMNS["test"] + EXTRA_METRIC_COLUMNS["lag"],
        metric_columns(get_config("fashion", "noniid")),
    ):
        p = tmp_path / "m.csv"
        p.write_text(",".join(cols) + "\n" + ",".join("1" for _ in cols) + "\n")
        assert tuple(read_metrics(p)[0]) == cols
    bad = METRIC_COLUMNS + ("lag_mean_norm1",)  # half a group
    p.write_text(",".join(bad) + "\n")
    with pytest.raises(RunDirError, match="has columns"):
        read_metrics(p)


def test_resume_accepts_a_config_written_before_new_fields(tmp_path):
    from renorm_repro.runs import prepare_experiment_dir

    cfg = get_config("smoke", "microbatch")
    prepare_experiment_dir(tmp_path / "e", cfg, resume=False)
    rec = json.loads((tmp_path / "e" / "config.json").read_text())
    for new_field in ("val_examples", "lr_schedule", "lr_decay_at", "lr_decay_factor", "eval_lag_examples"):
        rec["config"].pop(new_field)
    (tmp_path / "e" / "config.json").write_text(json.dumps(rec))
    prepare_experiment_dir(tmp_path / "e", cfg, resume=True)  # the defaults: the same experiment
    changed = get_config("smoke", "microbatch", {"lr_schedule": "cosine"})
    with pytest.raises(RunDirError, match="lr_schedule: None -> 'cosine'"):
        prepare_experiment_dir(tmp_path / "e", changed, resume=True)


def test_compare_pairs_the_same_arm_across_two_folders(tmp_path):
    from renorm_repro.report import compare, compare_table

    cfg = get_config("fashion", "iid", {"arms": "bn,brn", "seeds": "0,1,2,3,4"})
    _fake_experiment(
        tmp_path / "const",
        cfg,
        {"bn": {s: 0.80 + 0.01 * s for s in range(5)}, "brn": {s: 0.70 + 0.02 * s for s in range(5)}},
    )
    _fake_experiment(
        tmp_path / "cos",
        cfg,
        {"bn": {s: 0.81 + 0.01 * s for s in range(5)}, "brn": {s: 0.75 + 0.02 * s for s in range(5)}},
    )
    res = compare(tmp_path / "const", tmp_path / "cos", scalars=["test_final"])
    by_arm = {r["arm"]: r for r in res["rows"]}
    # bn's seed 4 is unfinished in both folders: 4 pairs; brn: 5 pairs, each +0.05.
    assert by_arm["bn"]["diff"]["n"] == 4 and by_arm["bn"]["diff"]["mean"] == pytest.approx(0.01)
    assert by_arm["brn"]["diff"]["n"] == 5 and by_arm["brn"]["diff"]["mean"] == pytest.approx(0.05)
    assert by_arm["brn"]["diff"]["half_width"] == pytest.approx(0.0, abs=1e-12)  # the same gain on every seed
    assert (
        "| Batch Renorm | test_final | 74.00 [70.07, 77.93] | 79.00 [75.07, 82.93] | 5.00 [5.00, 5.00], 5/5 |"
        in compare_table(res)
    )
    with pytest.raises(RunDirError, match=r"arms \['keras_brn'\] are not in both"):
        compare(tmp_path / "const", tmp_path / "cos", arms=["keras_brn"])


def test_data_dir_that_is_a_device_is_named_as_such():
    with pytest.raises(D.DataError, match="'/dev/null' is neither a folder nor a file"):
        D.load_cifar100("/dev/null")
    with pytest.raises(D.DataError, match="'/dev/null' is not a folder"):
        D.load_fashion_mnist("/dev/null")


def test_cli_compare_writes_table_and_figure(tmp_path, capsys):
    from renorm_repro.cli import main

    cfg = get_config("fashion", "iid", {"arms": "bn,brn", "seeds": "0,1,2,3,4"})
    _fake_experiment(tmp_path / "const", cfg, {"bn": {s: 0.80 for s in range(5)}, "brn": {s: 0.70 for s in range(5)}})
    _fake_experiment(tmp_path / "cos", cfg, {"bn": {s: 0.81 for s in range(5)}, "brn": {s: 0.75 for s in range(5)}})
    rc = main(
        [
            "compare",
            "--a",
            str(tmp_path / "const"),
            "--b",
            str(tmp_path / "cos"),
            "--arms",
            "brn",
            "--figure",
            str(tmp_path / "fig.png"),
            "--table",
            str(tmp_path / "t.md"),
        ]
    )
    assert rc == 0
    table = (tmp_path / "t.md").read_text()
    assert "| Batch Renorm | test_final | 70.00 (" not in table  # 5 seeds: intervals, not single runs
    assert (
        "| Batch Renorm | test_final | 70.00 [70.00, 70.00] | 75.00 [75.00, 75.00] | 5.00 [5.00, 5.00], 5/5 |" in table
    )
    assert "Batch Norm" not in table.split("\n", 3)[-1]  # --arms brn only
    assert (tmp_path / "fig.png").stat().st_size > 1000 and (tmp_path / "fig.svg").is_file()
    rc = main(["compare", "--a", str(tmp_path / "const"), "--b", str(tmp_path / "cos"), "--arms", "keras_brn"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "are not in both" in err


def test_a_download_cut_short_is_never_taken_for_the_file(tmp_path):
    """keras.utils.get_file downloads (file:// here, no network); a .part file left by a killed download is
    downloaded again, with or without a checksum, and only a complete, checked file gets the final name."""
    sums = write_small_fashion(tmp_path / "mirror")
    url = (tmp_path / "mirror").as_uri()
    folder = tmp_path / "cache" / "fashion-mnist"
    folder.mkdir(parents=True)
    stems = [f[0] for f in D.FASHION_MNIST_FILES.values()]
    good = {s: (tmp_path / "mirror" / (s + ".gz")).read_bytes() for s in stems}
    for s in stems:  # what kill -9 in the middle of each download leaves
        (folder / (s + ".gz.part")).write_bytes(good[s][: len(good[s]) // 2])
    assert D.download_fashion_mnist(tmp_path / "cache", url=url, check=False) == folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {s + ".gz": good[s] for s in stems}
    ds = D.load_fashion_mnist(folder, checksums=sums, shapes=SMALL)
    assert len(ds.y_train) == SMALL["train_labels"][0]
