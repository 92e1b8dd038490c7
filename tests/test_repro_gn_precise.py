"""The Group Normalization arm (``gn``, ``gn_groups``) and precise BN (``precise_bn_batches``) of renorm_repro.

No TensorFlow: the configs, their validation, the columns, the committed configs still load and resume, and a
GN folder pools with the committed batch-norm final of the same seeds. With TensorFlow (smoke data): a run with
precise BN on trains exactly as with it off (every training column and every checkpointed tensor), its precise
columns differ from the plain ones, the recomputed statistics are the NumPy moments of each layer's inputs over
the fixed batches, and the gn arm runs end to end with NaN where a batch-norm-only metric has no meaning.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from renorm_repro import config as C
from renorm_repro import study
from renorm_repro.data import batch_indices
from renorm_repro.runs import (
    EXTRA_METRIC_COLUMNS,
    METRIC_COLUMNS,
    _config_diff,
    metric_columns,
    read_experiment_config,
    read_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
# The Figure 3 final of results/fashion-mnist/run_all.sh (FINAL_NONIID), as overrides of the fashion preset.
FINAL_NONIID = {
    "warmup_time_constants": "20",
    "rmax": "1.5",
    "dmax": "0.5",
    "seeds": "20,21,22,23,24",
    "log_clip_means": "true",
}


# ----------------------------------------------------------------- no TensorFlow
@pytest.mark.parametrize("experiment", ["noniid", "microbatch", "iid"])
def test_the_gn_arm_exists_in_every_experiment_with_its_groups(experiment):
    cfg = C.get_config("fashion", experiment, {"arms": "gn", "gn_groups": "8"})
    spec = cfg.arm_spec("gn")
    assert spec["impl"] == "group_norm" and spec["groups"] == 8 and spec["microbatch_size"] == 1
    assert "Group Norm, 8 groups" in cfg.arm_label("gn")
    assert cfg.derived()["arms"]["gn"]["groups"] == 8
    assert "gn_groups" in type(cfg).ARM_KEYS  # read only through the arm: poolable
    both = C.get_config("fashion", experiment, {"arms": ",".join(C.get_config("fashion", experiment).arms) + ",gn"})
    pairs = both.comparisons()
    assert any(b == "gn" for _, b in pairs)
    if experiment != "microbatch":
        assert ("bn", "gn") in pairs and ("brn", "gn") in pairs
    else:
        assert ("bn_micro", "gn") in pairs and ("brn_micro", "gn") in pairs


def test_gn_groups_must_divide_the_width_only_when_the_arm_runs():
    with pytest.raises(C.ConfigError, match=r"`gn_groups` must divide width=16.*got gn_groups=3"):
        C.get_config("fashion", "noniid", {"arms": "bn,gn", "gn_groups": "3"})
    with pytest.raises(C.ConfigError, match=r"`gn_groups` must be >= 1.*got gn_groups=0"):
        C.get_config("fashion", "noniid", {"gn_groups": "0"})
    # The default (4) does not divide the smoke presets' width 2, which is fine without the arm.
    assert C.get_config("smoke", "noniid").gn_groups == 4
    for g in (1, 2, 4, 8, 16):
        C.get_config("fashion", "microbatch", {"arms": "gn", "gn_groups": str(g)})
    with pytest.raises(C.ConfigError, match="precise_bn_batches"):
        C.get_config("smoke", "iid", {"precise_bn_batches": "-1"})


def test_precise_columns_follow_the_evaluations_that_are_logged():
    cfg = C.get_config("fashion", "noniid", {"precise_bn_batches": "100"})
    cols = metric_columns(cfg)
    assert cols[: len(metric_columns(C.get_config("fashion", "noniid")))] == metric_columns(
        C.get_config("fashion", "noniid")
    )
    assert cols[-6:] == (
        EXTRA_METRIC_COLUMNS["precise"]
        + EXTRA_METRIC_COLUMNS["precise_test"]
        + EXTRA_METRIC_COLUMNS["precise_train_eval"]
    )
    smoke = C.get_config("smoke", "iid", {"precise_bn_batches": "2"})
    assert metric_columns(smoke) == METRIC_COLUMNS + ("val_loss_precise", "val_accuracy_precise")


def test_precise_batches_are_fixed_iid_batches_of_the_batch_size():
    cfg = C.get_config("fashion", "noniid", {"precise_bn_batches": "100"})
    b = cfg.precise_bn_indices(55000)
    assert len(b) == 100 and all(len(x) == 32 for x in b)
    assert len(set(np.concatenate(b).tolist())) == 3200  # within one shuffled epoch: distinct examples
    for i in (0, 57, 99):
        np.testing.assert_array_equal(b[i], batch_indices(55000, 32, C.ExperimentConfig.PRECISE_BN_SEED, i))
    other = C.get_config("fashion", "noniid", {"precise_bn_batches": "100", "seeds": "7"})
    np.testing.assert_array_equal(np.concatenate(other.precise_bn_indices(55000)), np.concatenate(b))


def _committed_experiment_configs():
    return sorted(p for p in RESULTS.rglob("config.json") if "runs" not in p.relative_to(RESULTS).parts)


def test_every_committed_config_still_loads_and_resumes_without_a_difference():
    """Configs written before gn_groups and precise_bn_batches existed: the defaults keep them valid."""
    paths = _committed_experiment_configs()
    assert paths
    old = 0
    for path in paths:
        written = json.loads(path.read_text())["config"]
        cfg = C.config_from_dict(written)
        # a field the file does not name takes its default; one it names keeps its value
        assert cfg.gn_groups == written.get("gn_groups", 4), path
        assert cfg.precise_bn_batches == written.get("precise_bn_batches", 0), path
        assert _config_diff(path, cfg) == {}, path  # what --resume checks
        if "precise_bn_batches" not in written:
            old += 1
            assert not any("precise" in c for c in metric_columns(cfg)), path  # no precise column added
    assert old, "no committed config predates gn_groups and precise_bn_batches"


def _folder(root, cfg, accs):
    """An experiment folder whose runs evaluate ``accs[arm][seed]`` (test; val 0.01 less) at every step."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"config": C.config_to_dict(cfg), "derived": cfg.derived()}))
    cols = metric_columns(cfg)
    for arm, by_seed in accs.items():
        for seed, acc in by_seed.items():
            d = root / "runs" / arm / f"seed{seed}"
            d.mkdir(parents=True)
            lines = [",".join(cols)]
            for step in range(250, cfg.steps + 1, 250):
                row = {c: (float("nan") if c.startswith("lag_") else 0.25) for c in cols}
                row.update(test_accuracy=acc, val_accuracy=acc - 0.01)
                lines.append(",".join(str(step) if c == "step" else repr(row[c]) for c in cols))
            (d / "metrics.csv").write_text("\n".join(lines) + "\n")
            (d / "done.json").write_text("{}")
    return root


def test_a_gn_folder_pools_with_the_committed_figure_3_final_of_the_same_seeds(tmp_path):
    committed = RESULTS / "fashion-mnist" / "final" / "noniid-bn"
    if not (committed / "runs" / "bn" / "seed24" / "done.json").is_file():
        pytest.skip("the committed final/noniid-bn runs are not here")
    assert "gn_groups" not in json.loads((committed / "config.json").read_text())["config"]
    seeds = (20, 21, 22, 23, 24)
    gn = {s: 0.85 + 0.001 * s for s in seeds}
    for groups in ("8", "4"):
        cfg = C.get_config("fashion", "noniid", dict(FINAL_NONIID, arms="gn", gn_groups=groups))
        folder = _folder(tmp_path / f"gn{groups}", cfg, {"gn": gn})
        res = study.pool([committed, folder])
        expect = {} if groups == "4" else {"gn_groups": {str(committed): 4, str(folder): 8}}
        assert res["differs"] == expect
        assert res["arms"]["gn"]["label"] == f"Group Norm, {groups} groups, non-i.i.d."
        for a in ("bn", "bn_iid"):
            p = next(p for p in res["paired"] if (p["a"], p["b"], p["scalar"]) == (a, "gn", "test_last4"))
            assert p["seeds"] == list(seeds)
            bn = res["arms"][a]["scalars"]["test_last4"]["per_seed"]
            np.testing.assert_allclose(p["differences"], [gn[s] - bn[s] for s in seeds], atol=1e-12)
        assert "lag_late" not in res["arms"]["gn"]["scalars"]  # NaN columns give no scalar
        study.pool_table(res)
    # A folder whose training differs (the width) is still refused.
    wide = C.get_config("fashion", "noniid", dict(FINAL_NONIID, arms="gn", width="8"))
    with pytest.raises(Exception, match=r"width \(16 vs 8\)"):
        study.pool([committed, _folder(tmp_path / "wide", wide, {"gn": gn})])
    assert read_experiment_config(committed).arms == ("bn", "bn_iid")


# -------------------------------------------------------------- with TensorFlow
def _run(tmp_path, name, experiment="noniid", **overrides):
    from renorm_repro.cli import run_experiment

    cfg = C.get_config("smoke", experiment, dict({"cache_dir": str(tmp_path / "cache")}, **overrides))
    run_experiment(cfg, tmp_path / name, progress=False, log=lambda m: None)
    return cfg, tmp_path / name


def _checkpoint_tensors(rdir):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(rdir / "checkpoints")))
    names = [k for k in reader.get_variable_to_dtype_map() if "save_counter" not in k and "OBJECT_GRAPH" not in k]
    return {k: reader.get_tensor(k) for k in names}  # the object graph names the optimizer (adam, adam_2, ...)


def test_precise_bn_leaves_training_bit_for_bit_unchanged(tmp_path):
    """Every column of the run without it, every checkpointed tensor equal; the precise columns differ."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("renorm.tf")
    common = dict(arms="bn,brn", val_examples="16", eval_lag_examples="32", log_clip_means="true")
    cfg_off, off = _run(tmp_path, "off", **common)
    cfg_on, on = _run(tmp_path, "on", precise_bn_batches="3", **common)
    assert metric_columns(cfg_on)[-6:] == (
        "val_loss_precise",
        "val_accuracy_precise",
        "test_loss_precise",
        "test_accuracy_precise",
        "train_eval_loss_precise",
        "train_eval_accuracy_precise",
    )
    differ = 0
    for arm in ("bn", "brn"):
        a = read_metrics(on / "runs" / arm / "seed0" / "metrics.csv")
        b = read_metrics(off / "runs" / arm / "seed0" / "metrics.csv")
        assert len(a) == len(b) == cfg_on.steps // cfg_on.eval_every
        for ra, rb in zip(a, b):
            assert {k: v for k, v in ra.items() if k != "elapsed_s" and not k.endswith("_precise")} == {
                k: v for k, v in rb.items() if k != "elapsed_s"
            }
            assert all(math.isfinite(ra[c]) for c in metric_columns(cfg_on) if c.endswith("_precise"))
            differ += ra["val_loss_precise"] != ra["val_loss"]
        ta, tb = _checkpoint_tensors(on / "runs" / arm / "seed0"), _checkpoint_tensors(off / "runs" / arm / "seed0")
        assert ta.keys() == tb.keys()
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    assert differ > 0  # the recomputed statistics change the evaluation


def test_recomputed_statistics_are_the_numpy_moments_of_each_layers_inputs(tmp_path):
    """Layer by layer: layer j's (mean, sqrt(var + eps)) over the fixed batches, its inputs computed with the
    layers before it already using their recomputed statistics."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("renorm.tf")
    import keras

    from renorm_repro import data as D
    from renorm_repro.train import _Evaluator, build_model, make_norm_layer

    cfg = C.get_config(
        "smoke", "noniid", {"arms": "bn", "precise_bn_batches": "5", "cache_dir": str(tmp_path), "width": "3"}
    )
    ds = D.load_dataset(
        "synthetic", cache_dir=str(tmp_path), num_train=cfg.synthetic_train, num_test=cfg.synthetic_test, num_classes=4
    )
    keras.utils.set_random_seed(1)
    model = build_model(ds.image_shape, ds.num_classes, cfg.width, lambda name: make_norm_layer(cfg, "bn", name))
    norm_layers = [layer for layer in model.layers if layer.name.startswith("norm")]
    st = SimpleNamespace(  # what the evaluator reads of a _RunState
        model=model,
        norm_layers=norm_layers,
        prep=lambda x: (np.float32(x) / 255.0 - ds.mean / 255.0) / (ds.std / 255.0),
    )
    for layer in st.norm_layers:  # moving statistics far from the data's, as early in training
        layer.moving_mean.assign(np.full(layer.moving_mean.shape, 3.0, np.float32))
        layer.moving_stddev.assign(np.full(layer.moving_stddev.shape, 0.1, np.float32))
    ev = _Evaluator.__new__(_Evaluator)
    ev.cfg, ev.st = cfg, st
    ev._init_precise(ds.x_train)
    assert ev.precise_batches.shape == (5, cfg.batch_size)
    np.testing.assert_array_equal(ev.precise_batches, np.stack(cfg.precise_bn_indices(len(ds.y_train))))
    stats = ev.precise_statistics()
    x = st.prep(ds.x_train[ev.precise_batches.reshape(-1)])
    for j, layer in enumerate(st.norm_layers):
        f = np.asarray(keras.Model(model.inputs, layer.input)(x, training=False), np.float64)
        f = f.reshape(-1, f.shape[-1])
        mean, std = f.mean(0), np.sqrt(f.var(0) + cfg.epsilon)
        np.testing.assert_allclose(stats[j][0], mean, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(stats[j][1], std, rtol=1e-9)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.moving_stddev.numpy(), std, rtol=1e-5)


def test_the_gn_arm_trains_end_to_end_with_nan_for_batch_norm_metrics(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("renorm.tf")
    cfg, out = _run(
        tmp_path,
        "gn",
        arms="bn,gn",
        gn_groups="2",
        eval_lag_examples="32",
        log_clip_means="true",
        precise_bn_batches="2",
    )
    rec = json.loads((out / "runs" / "gn" / "seed0" / "config.json").read_text())
    assert rec["config"]["gn_groups"] == 2 and rec["normalization"]["impl"] == "group_norm"
    assert json.loads((out / "config.json").read_text())["config"]["gn_groups"] == 2
    gn = read_metrics(out / "runs" / "gn" / "seed0" / "metrics.csv")
    bn = read_metrics(out / "runs" / "bn" / "seed0" / "metrics.csv")
    for row in gn:
        for col in ("r_clipped", "d_clipped", "r_clipped_mean", "val_accuracy_precise", "lag_mean_norm1"):
            assert math.isnan(row[col]), col
        assert 0.0 <= row["val_accuracy"] <= 1.0 and math.isfinite(row["train_loss"])
        assert 0.0 <= row["val_batchstat_accuracy"] <= 1.0  # group norm in training mode: as in inference
    assert all(math.isfinite(r["lag_mean_norm1"]) and math.isfinite(r["val_accuracy_precise"]) for r in bn)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["gn"]["label"] == "Group Norm, 2 groups, non-i.i.d."
    assert ["bn", "gn"] in summary["comparisons"]
    assert "lag_mean" not in summary["arms"]["gn"]["curves"]
    assert "Group Norm, 2 groups" in (out / "summary.md").read_text()
    # The layers really are Keras's GroupNormalization.
    import keras

    from renorm_repro.train import make_norm_layer

    assert isinstance(make_norm_layer(cfg, "gn", "norm1"), keras.layers.GroupNormalization)
