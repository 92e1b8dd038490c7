"""renorm_repro end to end with TensorFlow: BN-arm equivalence, smoke preset, resume, run-folder safety, plot."""

import contextlib
import csv
import io
import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("renorm.tf")

from renorm_repro import config as C  # noqa: E402
from renorm_repro.cli import main  # noqa: E402
from renorm_repro.runs import METRIC_COLUMNS, RunDirError  # noqa: E402
from renorm_repro.train import make_norm_layer  # noqa: E402


@pytest.mark.parametrize("arm, k", [("bn_micro", 2), ("bn_micro", 4), ("bn_32", 32)])
def test_bn_arm_equals_keras_batch_norm_on_each_micro_batch(arm, k):
    cfg = C.get_config("smoke", overrides={"microbatch_size": k, "batch_size": 64})
    layer = make_norm_layer(cfg, arm)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(3.0, 2.0, size=(64, 5, 5, 3)).astype(np.float32))
    dy = tf.constant(rng.normal(size=(64, 5, 5, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        ours = layer(x, training=True)
        loss = tf.reduce_sum(ours * dy)
    ours_dx = tape.gradient(loss, x)
    ref = keras.layers.BatchNormalization(momentum=cfg.momentum, epsilon=cfg.epsilon)
    outs, dxs = [], []
    for g in range(64 // k):
        xg = x[g * k : (g + 1) * k]
        with tf.GradientTape() as tape:
            tape.watch(xg)
            yg = ref(xg, training=True)
            lg = tf.reduce_sum(yg * dy[g * k : (g + 1) * k])
        outs.append(yg)
        dxs.append(tape.gradient(lg, xg))
    np.testing.assert_allclose(ours.numpy(), tf.concat(outs, 0).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours_dx.numpy(), tf.concat(dxs, 0).numpy(), rtol=1e-3, atol=1e-4)
    # The moving statistics moved by 1 - momentum towards the mean over groups of the batch statistics.
    mu_g = x.numpy().reshape(64 // k, -1, 3).mean(1)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.01 * mu_g.mean(0), rtol=1e-4)


def test_brn_arm_uses_the_scaled_paper_schedule():
    cfg = C.get_config("seed")
    layer = make_norm_layer(cfg, "brn_micro")
    assert (layer.rmax, layer.dmax, layer.warmup_steps, layer.rmax_steps, layer.dmax_steps) == (
        3.0,
        5.0,
        250,
        2000,
        1250,
    )
    assert layer.microbatch_size == 2 and layer.momentum == 0.99 and layer.epsilon == cfg.epsilon


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke preset's run folder, its cache and what the command printed (stdout, not a terminal)."""
    out = tmp_path_factory.mktemp("smoke") / "out"
    cache = tmp_path_factory.mktemp("cache")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", "--preset", "smoke", "--out", str(out), "--cache-dir", str(cache), "--no-progress"]) == 0
    return out, cache, printed.getvalue()


@pytest.fixture(scope="module")
def smoke_out(smoke_run):
    return smoke_run[:2]


def test_piped_output_is_a_line_per_run_and_ends_with_the_finding(smoke_run):
    """Not a terminal, runs shorter than --log-interval (60 s): each run's last evaluation only, not one line
    per evaluation (issue 34 item 6); metrics.csv keeps them all; the finding is the last line."""
    out, _, printed = smoke_run
    cfg = C.get_config("smoke")
    lines = printed.splitlines()
    evaluations = [ln for ln in lines if " step " in ln and ln.startswith("[")]
    assert evaluations == [ln for ln in evaluations if f" step {cfg.steps}/{cfg.steps} " in ln]
    assert sorted(ln.split("]")[0] + "]" for ln in evaluations) == sorted(f"[{a} seed0]" for a in cfg.arms)
    assert len(_rows(out / "runs" / "bn_micro" / "seed0" / "metrics.csv")) == cfg.steps // cfg.eval_every > 1
    assert lines[-1].startswith("Finding (") and len(lines) < 60, printed  # the summary table before it


def test_smoke_preset_end_to_end_writes_everything(smoke_out):
    out, _ = smoke_out
    cfg = C.get_config("smoke")
    for name in ("config.json", "versions.json", "summary.md", "summary.json", "accuracy.png", "accuracy.svg"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "config.json").read_text())
    assert record["derived"]["arms"]["brn_micro"]["schedule"] == cfg.schedule().to_dict()
    versions = json.loads((out / "versions.json").read_text())
    assert versions["packages"]["tensorflow"] and versions["git_revision"]
    for arm in cfg.arms:
        rdir = out / "runs" / arm / "seed0"
        rows = _rows(rdir / "metrics.csv")
        assert tuple(rows[0]) == METRIC_COLUMNS
        assert [int(r["step"]) for r in rows] == list(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))
        assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in rows)
        assert json.loads((rdir / "config.json").read_text())["arm"] == arm
        assert (rdir / "done.json").is_file() and any((rdir / "checkpoints").glob("ckpt-*.index"))
    brn = _rows(out / "runs" / "brn_micro" / "seed0" / "metrics.csv")
    assert float(brn[-1]["rmax"]) == 3.0 and float(brn[-1]["dmax"]) == 5.0
    bn = _rows(out / "runs" / "bn_micro" / "seed0" / "metrics.csv")
    assert float(bn[-1]["rmax"]) == 1.0 and float(bn[-1]["dmax"]) == 0.0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == set(cfg.arms)
    assert "| Batch Renorm, micro-batch 2 | 1 |" in (out / "summary.md").read_text()


def test_rerun_into_the_same_folder_is_refused(smoke_out, capsys):
    out, cache = smoke_out
    before = (out / "runs" / "bn_micro" / "seed0" / "metrics.csv").read_bytes()
    assert main(["run", "--preset", "smoke", "--out", str(out), "--cache-dir", str(cache)]) == 1
    assert "already holds an experiment" in capsys.readouterr().err
    # --resume with another config is refused too; nothing is overwritten.
    assert (
        main(["run", "--preset", "smoke", "--out", str(out), "--cache-dir", str(cache), "--resume", "--width", "4"])
        == 1
    )
    err = capsys.readouterr().err
    assert "config differs" in err and "width: 2 -> 4" in err
    # More --steps would extend it, but the preset's clipping schedule scales with steps: refused, saying why.
    assert (
        main(["run", "--preset", "smoke", "--out", str(out), "--cache-dir", str(cache), "--resume", "--steps", "16"])
        == 1
    )
    err = capsys.readouterr().err
    assert "cannot continue exactly as if it had been started with 16 steps" in err and "paper_scaled" in err
    assert (out / "runs" / "bn_micro" / "seed0" / "metrics.csv").read_bytes() == before


def test_plot_reads_only_the_logs(smoke_out, tmp_path):
    out, _ = smoke_out
    # Copy only config.json and the logs (metrics.csv, done.json): the plot must work from them alone.
    copy = tmp_path / "copy"
    (copy).mkdir()
    (copy / "config.json").write_text((out / "config.json").read_text())
    for src in (out / "runs").glob("*/seed*/metrics.csv"):
        dst = copy / src.relative_to(out)
        dst.parent.mkdir(parents=True)
        dst.write_bytes(src.read_bytes())
        (dst.parent / "done.json").write_bytes((src.parent / "done.json").read_bytes())
    assert main(["plot", "--out", str(copy)]) == 0
    assert (copy / "accuracy.png").is_file() and (copy / "accuracy.svg").is_file()
    assert json.loads((copy / "summary.json").read_text()) == json.loads((out / "summary.json").read_text())


# A short Batch Renorm run to kill and resume: checkpoints at steps 4 and 8, a log row every 2 steps, every
# evaluation's line printed (the tests read them).
RESUMABLE = ["--preset", "smoke", "--arms", "brn_micro", "--steps", "10", "--eval-every", "2"]
RESUMABLE += ["--checkpoint-every", "4", "--no-progress", "--log-interval", "0"]


def _rows_but_time(path):
    """The rows of a metrics.csv without the wall-time column (the only one that differs between equal runs)."""
    rows = _rows(path)
    for r in rows:
        r.pop("elapsed_s")
    return rows


def test_resume_after_a_kill_ends_with_identical_metrics(tmp_path, capsys):
    common = [*RESUMABLE, "--cache-dir", str(tmp_path / "cache")]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", "--out", str(full)] + common) == 0
    # Killed after 7 steps: the last checkpoint is at step 4, rows for 6 were logged after it.
    assert main(["run", "--out", str(cut), "--stop-after", "7"] + common) == 0
    rdir = cut / "runs" / "brn_micro" / "seed0"
    assert not (rdir / "done.json").exists()
    assert [int(r["step"]) for r in _rows(rdir / "metrics.csv")] == [2, 4, 6]
    capsys.readouterr()
    assert main(["run", "--out", str(cut), "--resume"] + common) == 0
    log = capsys.readouterr().out
    assert "resumed from" in log and "ckpt-4 at step 4" in log  # continued, not restarted
    assert "step 2/10" not in log and "step 6/10" in log
    a = _rows_but_time(full / "runs" / "brn_micro" / "seed0" / "metrics.csv")
    b = _rows_but_time(rdir / "metrics.csv")
    assert [r["step"] for r in b] == ["2", "4", "6", "8", "10"]
    assert a == b  # bit-identical values, as written
    # A second --resume of a finished run changes nothing.
    assert main(["run", "--out", str(cut), "--resume"] + common) == 0
    assert [r["step"] for r in _rows(rdir / "metrics.csv")] == ["2", "4", "6", "8", "10"]


@pytest.mark.parametrize("extra", [[], ["--ema-decay", "0.9", "--log-clip-means", "true"]])
def test_a_later_seed_reuses_its_arms_traced_step_and_trains_the_same_bits(tmp_path, monkeypatch, extra):
    """RunCache: in one command each arm's step is traced once, and a later seed, trained through the first
    seed's functions after its fresh values are copied in, logs what it logs alone (every column but the time)."""
    import renorm_repro.train as T

    traced = []
    original = T._train_step
    monkeypatch.setattr(T, "_train_step", lambda *a: traced.append(a[0].seeds) or original(*a))
    common = ["--preset", "smoke", "--arms", "bn_micro,brn_micro", "--no-progress", *extra]
    assert main(["run", *common, "--seeds", "3,4", "--out", str(tmp_path / "both")]) == 0
    assert len(traced) == 2  # one a arm, not one a run
    assert main(["run", *common, "--seeds", "4", "--out", str(tmp_path / "alone")]) == 0
    for arm in ("bn_micro", "brn_micro"):
        both, alone = (_rows_but_time(tmp_path / d / "runs" / arm / "seed4" / "metrics.csv") for d in ("both", "alone"))
        assert both == alone and len(both) > 1, arm
    first = _rows(tmp_path / "both" / "runs" / "brn_micro" / "seed3" / "metrics.csv")
    assert [r["train_loss"] for r in first] != [r["train_loss"] for r in both]  # the seeds differ


def test_a_later_seed_resumed_through_the_cache_ends_like_the_uninterrupted_run(tmp_path):
    """Both seeds stopped mid-run, then one --resume: the second seed's run restores its checkpoint into the first
    seed's cached variables (RunCache) and must end with the uninterrupted run's metrics, every column but the time."""
    common = [*RESUMABLE, "--seeds", "0,1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", "--out", str(full)] + common) == 0
    assert main(["run", "--out", str(cut), "--stop-after", "7"] + common) == 0
    assert not any((cut / "runs" / "brn_micro" / f"seed{s}" / "done.json").exists() for s in (0, 1))
    assert main(["run", "--out", str(cut), "--resume"] + common) == 0
    for seed in (0, 1):
        a, b = (_rows_but_time(d / "runs" / "brn_micro" / f"seed{seed}" / "metrics.csv") for d in (full, cut))
        assert a == b and [r["step"] for r in b] == ["2", "4", "6", "8", "10"], seed


def test_ema_and_rmsprop_options_run(tmp_path):
    cfg = C.get_config(
        "smoke",
        overrides={
            "arms": "brn_micro",
            "steps": 4,
            "eval_every": 2,
            "ema_decay": 0.9,
            "optimizer": "rmsprop",
            "cache_dir": str(tmp_path / "cache"),
        },
    )
    from renorm_repro.cli import run_experiment

    report = run_experiment(cfg, tmp_path / "out", progress=False, log=lambda m: None)
    assert report["aggregate"]["arms"]["brn_micro"]["final_step"] == 4
    with pytest.raises(RunDirError, match="exists and is not empty"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "file").write_text("x")
        run_experiment(cfg, tmp_path / "other", progress=False, log=lambda m: None)


def test_mirrored_strategy_and_mixed_precision_run(tmp_path):
    cfg = C.get_config(
        "smoke",
        overrides={
            "arms": "brn_micro",
            "steps": 2,
            "eval_every": 2,
            "strategy": "mirrored",
            "precision": "mixed_bfloat16",
            "cache_dir": str(tmp_path / "cache"),
        },
    )
    from renorm_repro.cli import run_experiment

    report = run_experiment(cfg, tmp_path / "out", progress=False, log=lambda m: None)
    assert report["aggregate"]["arms"]["brn_micro"]["final_step"] == 2
    assert keras.mixed_precision.global_policy().name == "float32"  # the policy is restored afterwards
    rec = json.loads((tmp_path / "out" / "runs" / "brn_micro" / "seed0" / "config.json").read_text())
    assert rec["replicas"] >= 1


def test_bench_measures_steps_per_second(capsys):
    assert main(["bench", "--preset", "smoke", "--bench-steps", "2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    assert (
        result["steps_per_s"] > 0
        and result["train_flops_per_step"] == C.get_config("smoke").derived()["train_flops_per_step"]
    )
