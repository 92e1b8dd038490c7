"""renorm_repro's other experiments: non-i.i.d. minibatches (Figure 3) and the i.i.d. baseline (Figure 1).

The batches the non-i.i.d. experiment really trains on (recorded from the
training loop), the half-split arrangement, the extra evaluations (training
accuracy in inference mode, validation with batch statistics) checked against
a hand computation from the final checkpoint, and smoke runs end to end.
"""

import csv
import json

import numpy as np
import pytest

from renorm import ClipSchedule
from renorm_repro import config as C
from renorm_repro import data as D
from renorm_repro.runs import (
    EXTRA_METRIC_COLUMNS,
    METRIC_COLUMNS,
    MetricsLog,
    RunDirError,
    metric_columns,
    read_metrics,
)


# ----------------------------------------------------------------- no TensorFlow
def test_split_pairs_order_puts_one_image_of_each_pair_in_each_half():
    idx = np.arange(32)  # draw i holds images 2i, 2i+1 (label-by-label order)
    out = D.split_pairs_order(idx, 16, 2, 2)
    np.testing.assert_array_equal(out[:16], np.arange(0, 32, 2))
    np.testing.assert_array_equal(out[16:], np.arange(1, 32, 2))
    # L x n = 2 x 4 in 2 parts: each part holds 2 images of each draw, draw by draw.
    np.testing.assert_array_equal(D.split_pairs_order(np.arange(8), 2, 4, 2), [0, 2, 4, 6, 1, 3, 5, 7])
    np.testing.assert_array_equal(D.split_pairs_order(np.arange(8), 2, 4, 1), np.arange(8))
    with pytest.raises(ValueError, match="groups=3 must divide per_label=2"):
        D.split_pairs_order(idx, 16, 2, 3)
    with pytest.raises(ValueError, match="not a batch of labels_per_batch x per_label"):
        D.split_pairs_order(idx[:30], 16, 2, 2)


def _check_noniid_batch(labels, idx, L=16, n=2):
    """16 x 2 in the split order: half j holds image j of every draw, draw by draw."""
    assert idx.shape == (L * n,)
    halves = idx.reshape(n, L)
    np.testing.assert_array_equal(labels[halves[0]], labels[halves[1]])  # the pairs: same label, across halves
    assert (halves[0] != halves[1]).all()  # two distinct images per draw


def test_noniid_config_arms_and_training_batches():
    cfg = C.get_config("digits", "noniid")
    assert (cfg.batch_size, cfg.labels_per_batch, cfg.per_label, cfg.split_groups) == (32, 16, 2, 2)
    assert cfg.arms == ("bn", "brn", "bn_split", "bn_iid")
    spec = {arm: cfg.arm_spec(arm) for arm in cfg.arms}
    assert spec["bn"] == {"microbatch_size": 32, "schedule": ClipSchedule.batch_norm()}
    assert spec["bn_split"] == {"microbatch_size": 16, "schedule": ClipSchedule.batch_norm()}
    assert spec["brn"] == {"microbatch_size": 32, "schedule": ClipSchedule.paper(cfg.steps), "impl": "renorm"}
    assert cfg.arm_spec("keras_brn") == dict(spec["brn"], impl="keras")
    labels = np.repeat(np.arange(10), 30)
    for step in range(4):
        same = [cfg.train_batch_indices(labels, 3, step, arm) for arm in ("bn", "brn", "bn_split")]
        for b in same[1:]:
            np.testing.assert_array_equal(b, same[0])  # every non-i.i.d. arm trains on the very same batches
        _check_noniid_batch(labels, same[0])
        np.testing.assert_array_equal(
            cfg.train_batch_indices(labels, 3, step, "bn_iid"), D.batch_indices(len(labels), 32, 3, step)
        )
    # Test minibatches of the batch-statistics evaluation: built the same way, a fixed seed for every run and arm.
    for arm in cfg.arms:
        ev = cfg.eval_batch_indices(labels, 5, arm)
        _check_noniid_batch(labels, ev)
        np.testing.assert_array_equal(ev, cfg.train_batch_indices(labels, C.ExperimentConfig.EVAL_SEED, 5, "bn"))
    assert cfg.eval_batch_count(500) == 16


def test_noniid_and_iid_configs_validate_and_derive():
    with pytest.raises(C.ConfigError, match=r"`batch_size` must equal labels_per_batch x per_label = 4 x 2 = 8"):
        C.get_config("digits", "noniid", {"labels_per_batch": "4"})
    cfg = C.get_config("digits", "noniid", {"labels_per_batch": "4", "per_label": "8", "batch_size": "32"})
    assert cfg.arm_spec("bn_split")["microbatch_size"] == 16
    with pytest.raises(C.ConfigError, match=r"`split_groups` must divide per_label=2"):
        C.get_config("digits", "noniid", {"split_groups": "4"})
    with pytest.raises(C.ConfigError, match=r"Unknown preset='seed' for experiment='noniid'"):
        C.get_config("seed", "noniid")
    with pytest.raises(C.ConfigError, match=r"Unknown config key --microbatch-size .*'noniid'"):
        C.get_config("digits", "noniid", {"microbatch-size": "2"})
    with pytest.raises(C.ConfigError, match=r"`arms` must be distinct names among \('bn', 'brn', 'keras_brn', 'gn'\)"):
        C.get_config("digits", "iid", {"arms": "bn,bn_split"})
    iid = C.get_config("digits", "iid")
    assert iid.batch_size == 32 and iid.arms == ("bn", "brn")
    d = iid.derived()
    assert d["arms"]["bn"]["groups_per_batch"] == 1 and d["arms"]["brn"]["schedule"] == iid.schedule().to_dict()
    for exp, presets in C.PRESETS_BY_EXPERIMENT.items():
        assert {"paper", "quick", "digits", "smoke"} <= set(presets)
        for name in presets:
            cfg = C.get_config(name, exp)
            assert C.config_from_dict(json.loads(json.dumps(C.config_to_dict(cfg)))) == cfg
            assert cfg.experiment == exp
    assert set(C.preset_names()) == {"paper", "quick", "digits", "fashion", "smoke", "seed"}


def test_metrics_columns_of_the_extra_evaluations(tmp_path):
    cfg = C.get_config("smoke", "noniid")
    cols = metric_columns(cfg)
    assert cols == METRIC_COLUMNS + EXTRA_METRIC_COLUMNS["train_eval"] + EXTRA_METRIC_COLUMNS["batchstat"]
    assert metric_columns(C.get_config("smoke")) == METRIC_COLUMNS
    log = MetricsLog(tmp_path / "m.csv", cols)
    log.start()
    row = {c: 0.5 for c in cols}
    row["step"] = 3
    log.append(row)
    assert read_metrics(tmp_path / "m.csv")[0]["val_batchstat_accuracy"] == 0.5
    with pytest.raises(ValueError, match="missing.*val_batchstat_accuracy"):
        log.append({c: 0.5 for c in METRIC_COLUMNS})
    (tmp_path / "bad.csv").write_text(",".join(METRIC_COLUMNS + ("mystery",)) + "\n")
    with pytest.raises(RunDirError, match="followed by any of"):
        read_metrics(tmp_path / "bad.csv")


# -------------------------------------------------------------- with TensorFlow
def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def noniid_smoke(tmp_path_factory):
    """The noniid smoke preset through the CLI, recording every batch the training loop asks for."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("renorm.tf")
    from renorm_repro.cli import main

    seen = []
    original = C.NoniidConfig.train_batch_indices

    def recording(self, labels, seed, step, arm=None):
        idx = original(self, labels, seed, step, arm)
        seen.append((arm, seed, step, np.asarray(labels), idx))
        return idx

    out = tmp_path_factory.mktemp("noniid") / "out"
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setattr(C.NoniidConfig, "train_batch_indices", recording)
    try:
        assert (
            main(
                [
                    "run",
                    "--experiment",
                    "noniid",
                    "--preset",
                    "smoke",
                    "--out",
                    str(out),
                    "--cache-dir",
                    str(cache),
                    "--no-progress",
                ]
            )
            == 0
        )
    finally:
        mp.undo()
    return out, cache, seen


def test_noniid_training_loop_trains_on_the_structured_batches(noniid_smoke):
    out, _, seen = noniid_smoke
    cfg = C.get_config("smoke", "noniid")
    L, n = cfg.labels_per_batch, cfg.per_label
    train = [s for s in seen if s[1] != C.ExperimentConfig.EVAL_SEED]
    for arm in cfg.arms:
        steps = sorted(s[2] for s in train if s[0] == arm)
        assert steps == list(range(cfg.steps)), arm  # every training step of every arm went through the hook
    for arm, _, step, labels, idx in train:
        if arm == "bn_iid":
            np.testing.assert_array_equal(idx, D.batch_indices(len(labels), cfg.batch_size, 0, step))
        else:
            _check_noniid_batch(labels, idx, L, n)
    evals = [s for s in seen if s[1] == C.ExperimentConfig.EVAL_SEED]
    assert {s[0] for s in evals} == {None}  # test minibatches: non-i.i.d. for every arm, also bn_iid
    # The bn_split arm's layers normalize the two halves (16 examples at the paper's size; 4 here) separately.
    rec = json.loads((out / "runs" / "bn_split" / "seed0" / "config.json").read_text())
    assert rec["normalization"]["microbatch_size"] == cfg.batch_size // 2


def test_noniid_smoke_end_to_end_writes_the_extra_evaluations(noniid_smoke):
    out, _, _ = noniid_smoke
    cfg = C.get_config("smoke", "noniid")
    for name in ("config.json", "summary.md", "summary.json", "accuracy.png", "accuracy.svg"):
        assert (out / name).stat().st_size > 0, name
    for arm in cfg.arms:
        rows = _rows(out / "runs" / arm / "seed0" / "metrics.csv")
        assert tuple(rows[0]) == metric_columns(cfg)
        assert [int(r["step"]) for r in rows] == list(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))
        for col in ("train_eval_accuracy", "val_batchstat_accuracy"):
            assert all(0.0 <= float(r[col]) <= 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "noniid" and set(summary["arms"]) == set(cfg.arms)
    bn = summary["arms"]["bn"]["curves"]
    last = _rows(out / "runs" / "bn" / "seed0" / "metrics.csv")[-1]
    assert bn["val_batchstat_accuracy"]["final_mean"] == float(last["val_batchstat_accuracy"])
    assert bn["train_eval_accuracy"]["mean"][-1] == float(last["train_eval_accuracy"])
    md = (out / "summary.md").read_text()
    assert "non-i.i.d. minibatches of 4 labels x 2 images" in md
    assert "final train acc., inference mode (%)" in md and "final val. acc., batch statistics (%)" in md
    assert "| Batch Norm, non-i.i.d., 2 parts of 4 | 1 |" in md
    from PIL import Image

    w, h = Image.open(out / "accuracy.png").size
    assert w > 2 * h  # two panels: validation, and training accuracy in inference mode


def test_extra_evaluations_match_a_hand_computation_from_the_checkpoint(noniid_smoke):
    """val_batchstat_* = the final model in training mode on the 4x2 test batches; train_eval_* = inference mode."""
    import keras
    import tensorflow as tf

    from renorm_repro.train import build_model, make_norm_layer, train_eval_subset

    out, cache, _ = noniid_smoke
    cfg = C.get_config("smoke", "noniid", {"cache_dir": str(cache)})
    ds = D.load_dataset(
        "synthetic",
        cache_dir=str(cache),
        num_train=cfg.synthetic_train,
        num_test=cfg.synthetic_test,
        num_classes=cfg.synthetic_classes,
    )
    rdir = out / "runs" / "bn" / "seed0"
    model = build_model(ds.image_shape, ds.num_classes, cfg.width, lambda name: make_norm_layer(cfg, "bn", name))
    tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(str(rdir / "checkpoints"))).expect_partial()

    def prep(x):
        return (x.astype(np.float32) / 255.0 - ds.mean / 255.0) / (ds.std / 255.0)

    state = [v.numpy() for v in model.non_trainable_variables]
    correct = total = 0
    for i in range(cfg.eval_batch_count(len(ds.y_test))):
        idx = cfg.eval_batch_indices(ds.y_test, i)
        logits = model(prep(ds.x_test[idx]), training=True).numpy()
        correct += int((logits.argmax(-1) == ds.y_test[idx]).sum())
        total += len(idx)
    for v, s in zip(model.non_trainable_variables, state):
        v.assign(s)
    sub = train_eval_subset(len(ds.y_train), cfg.eval_train_examples)
    logits = model(prep(ds.x_train[sub]), training=False).numpy()
    loss = float(keras.losses.sparse_categorical_crossentropy(ds.y_train[sub], logits, from_logits=True).numpy().mean())
    last = read_metrics(rdir / "metrics.csv")[-1]
    assert last["val_batchstat_accuracy"] == pytest.approx(correct / total, abs=1e-9)
    assert last["train_eval_accuracy"] == pytest.approx(float((logits.argmax(-1) == ds.y_train[sub]).mean()), abs=1e-9)
    assert last["train_eval_loss"] == pytest.approx(loss, rel=1e-4)


def test_batch_statistics_evaluation_leaves_training_unchanged(tmp_path):
    """The moving statistics and step counters are restored: runs with and without the extra evaluations agree."""
    pytest.importorskip("tensorflow")
    from renorm_repro.cli import run_experiment

    rows = {}
    for on in (True, False):
        cfg = C.get_config(
            "smoke",
            "noniid",
            {
                "arms": "brn",
                "cache_dir": str(tmp_path / "cache"),
                "eval_batch_stats": on,
                "eval_train_examples": 64 if on else 0,
            },
        )
        run_experiment(cfg, tmp_path / str(on), progress=False, log=lambda m: None)
        rows[on] = read_metrics(tmp_path / str(on) / "runs" / "brn" / "seed0" / "metrics.csv")
    assert "val_batchstat_accuracy" in rows[True][0] and "val_batchstat_accuracy" not in rows[False][0]
    for a, b in zip(rows[True], rows[False]):
        for col in METRIC_COLUMNS:
            if col != "elapsed_s":
                assert a[col] == b[col], col


def test_iid_smoke_end_to_end(tmp_path):
    pytest.importorskip("tensorflow")
    from renorm_repro.cli import main

    out = tmp_path / "iid"
    assert (
        main(
            [
                "run",
                "--experiment",
                "iid",
                "--preset",
                "smoke",
                "--out",
                str(out),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "iid" and list(summary["arms"]) == ["bn", "brn"]
    assert "i.i.d. minibatches of 8" in (out / "summary.md").read_text()
    brn = _rows(out / "runs" / "brn" / "seed0" / "metrics.csv")
    assert float(brn[-1]["rmax"]) == 3.0 and tuple(brn[0]) == METRIC_COLUMNS
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explicit_schedule_is_recorded_and_clip_means_average_every_step_of_the_interval(tmp_path):
    """--warmup-steps/--rmax/--dmax reach the layers (rmax column, config.json); r_clipped_mean is the mean
    over the interval's steps: with an evaluation every step it is that step's r_clipped, and with one every
    3 steps it is the mean of those 3 (training does not depend on the evaluations)."""
    pytest.importorskip("tensorflow")
    from renorm_repro.cli import main

    rows = {}
    for every in (1, 3):
        out = tmp_path / f"every{every}"
        assert (
            main(
                [
                    "run",
                    "--experiment",
                    "iid",
                    "--preset",
                    "smoke",
                    "--out",
                    str(out),
                    "--arms",
                    "brn",
                    "--cache-dir",
                    str(tmp_path / "cache"),
                    "--no-progress",
                    "--no-tensorboard",
                    "--warmup-steps",
                    "2",
                    "--rmax",
                    "1.05",
                    "--dmax",
                    "0.01",
                    "--rmax-steps",
                    "0",
                    "--dmax-steps",
                    "4",
                    "--log-clip-means",
                    "true",
                    "--eval-every",
                    str(every),
                ]
            )
            == 0
        )
        rows[every] = _rows(out / "runs" / "brn" / "seed0" / "metrics.csv")
        recorded = json.loads((out / "runs" / "brn" / "seed0" / "config.json").read_text())
        assert recorded["normalization"]["schedule"] == dict(
            rmax=1.05, dmax=0.01, warmup_steps=2, rmax_steps=0, dmax_steps=4
        )
        assert (
            json.loads((out / "config.json").read_text())["derived"]["arms"]["brn"]["schedule"]
            == recorded["normalization"]["schedule"]
        )
    every1, every3 = rows[1], rows[3]
    assert [float(r["rmax"]) for r in every1] == [1.0, 1.0, 1.05, 1.05, 1.05, 1.05]
    assert [float(r["dmax"]) for r in every1] == pytest.approx([0, 0, 0, 0.005, 0.01, 0.01])
    for r in every1:
        assert float(r["r_clipped_mean"]) == float(r["r_clipped"])
        assert float(r["d_clipped_mean"]) == float(r["d_clipped"])
    assert any(float(r["r_clipped"]) > 0 for r in every1)  # the limits bind: the means are not all 0
    for j, r in enumerate(every3):
        for col in ("r_clipped", "d_clipped"):
            want = np.mean([float(every1[3 * j + i][col]) for i in range(3)])
            assert float(r[col + "_mean"]) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_clip_means_survive_a_kill_between_checkpoint_and_evaluation(tmp_path):
    """The interval sums of --log-clip-means are checkpointed: a run stopped after the step-3 checkpoint and
    resumed logs, at its step-6 evaluation, the same means as an uninterrupted run."""
    pytest.importorskip("tensorflow")
    from renorm_repro.cli import main

    args = [
        "--experiment",
        "iid",
        "--preset",
        "smoke",
        "--arms",
        "brn",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        "--no-tensorboard",
        "--rmax",
        "1.05",
        "--dmax",
        "0.01",
        "--log-clip-means",
        "true",
        "--eval-every",
        "6",
        "--checkpoint-every",
        "3",
    ]
    assert main(["run", *args, "--out", str(tmp_path / "whole")]) == 0
    # The stopped run has no evaluation yet, so the report after it finds nothing to aggregate (exit 1).
    main(["run", *args, "--out", str(tmp_path / "cut"), "--stop-after", "4"])
    ckpts = tmp_path / "cut" / "runs" / "brn" / "seed0" / "checkpoints"
    assert (ckpts / "ckpt-3.index").is_file() and not (ckpts / "ckpt-6.index").exists()
    assert main(["run", "--out", str(tmp_path / "cut"), "--resume", "--no-progress", "--no-tensorboard"]) == 0
    whole, cut = (_rows(tmp_path / d / "runs" / "brn" / "seed0" / "metrics.csv") for d in ("whole", "cut"))
    assert len(whole) == len(cut) == 1
    for col in ("r_clipped_mean", "d_clipped_mean", "train_loss"):
        assert cut[0][col] == whole[0][col], col
    assert float(whole[0]["r_clipped_mean"]) > 0
