"""renorm_repro's TensorBoard event files: exactly the logged scalars at the logged steps, per-layer
clip diagnostics, and no point twice or past the checkpoint after a crash and ``--resume``.

The files are read back with TensorFlow's own ``tf.compat.v1.train.summary_iterator``
(TensorBoard itself is not a dependency), independently of the code that writes them.
"""

import csv
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("renorm.tf")

from renorm_repro.cli import main  # noqa: E402
from renorm_repro.runs import metric_columns, read_metrics  # noqa: E402
from renorm_repro.tensorboard_log import KEPT_NAME, EventLog  # noqa: E402

STEPS = 12
LAYERS = [f"norm{i}" for i in range(1, 5)]
PER_LAYER = ("r_clipped", "d_clipped", "rmax", "dmax")


def _args(out, cache, arms, *extra, steps=STEPS):
    return [
        "run",
        "--experiment",
        "noniid",
        "--preset",
        "smoke",
        "--arms",
        arms,
        "--steps",
        str(steps),
        "--eval-every",
        "2",
        "--checkpoint-every",
        "4",
        "--eval-lag-examples",
        "64",
        "--cache-dir",
        str(cache),
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def read_events(logdir):
    """``{tag: [(step, value), ...]}`` of every scalar in ``logdir``'s event files, in the order TensorBoard
    reads them (files by name); every value must carry the scalars plugin's metadata."""
    out = {}
    for f in sorted(p for p in Path(logdir).iterdir() if "tfevents" in p.name):
        for ev in tf.compat.v1.train.summary_iterator(str(f)):
            for v in ev.summary.value:
                assert v.metadata.plugin_data.plugin_name == "scalars", v
                out.setdefault(v.tag, []).append((ev.step, float(tf.make_ndarray(v.tensor))))
    return out


def assert_events_match_metrics(rdir, columns):
    """The events of ``rdir`` hold each column of its ``metrics.csv`` (but ``step``) and each layer's clip
    diagnostics at exactly the logged steps, once each, in order; the column values are the log's."""
    rows = read_metrics(Path(rdir) / "metrics.csv")
    steps = [r["step"] for r in rows]
    events = read_events(Path(rdir) / "tensorboard")
    tags = {c for c in columns if c != "step"} | {f"{n}/{k}" for n in LAYERS for k in PER_LAYER}
    assert set(events) == tags
    for tag, points in events.items():
        assert [s for s, _ in points] == steps, tag  # no step twice, none missing, none past the log
    for c in tags & set(columns):
        assert [v for _, v in events[c]] == [float(np.float32(r[c])) for r in rows], c
    return events


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """An uninterrupted run of both implementations (renorm.tf's and Keras's renorm)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(_args(out, cache, "brn,keras_brn")) == 0
    return out


def test_events_hold_every_logged_scalar_at_the_logged_steps(reference):
    from renorm_repro.config import get_config

    columns = metric_columns(get_config("smoke", "noniid", {"eval_lag_examples": 64}))
    assert {"train_eval_accuracy", "val_batchstat_accuracy", "lag_mean_norm4"} <= set(columns)
    for arm in ("brn", "keras_brn"):
        rdir = reference / "runs" / arm / "seed0"
        assert [p.name for p in (rdir / "tensorboard").iterdir()][0].startswith("events.out.tfevents.")
        events = assert_events_match_metrics(rdir, columns)
        with open(rdir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for i, row in enumerate(rows):
            for k in ("r_clipped", "d_clipped"):  # the log's value is the mean over the layers
                per_layer = [events[f"{n}/{k}"][i][1] for n in LAYERS]
                assert np.mean(per_layer) == pytest.approx(float(row[k]), abs=1e-6), (arm, k, row["step"])
            for k in ("rmax", "dmax"):  # every layer followed the schedule the log shows
                assert {events[f"{n}/{k}"][i][1] for n in LAYERS} == {float(np.float32(row[k]))}, (arm, k)
        assert {v for n in LAYERS for _, v in events[f"{n}/r_clipped"]} != {0.0}  # the clip did act


def test_resume_drops_the_points_past_the_checkpoint_and_writes_each_once(tmp_path, cache, reference, capsys):
    out = tmp_path / "out"
    rdir = out / "runs" / "brn" / "seed0"
    # Stopped after 11 steps: checkpoints at 4 and 8, rows (and events) for 2..10: step 10 lies past the checkpoint.
    assert main(_args(out, cache, "brn", "--stop-after", "11")) == 0
    assert sorted({s for pts in read_events(rdir / "tensorboard").values() for s, _ in pts}) == [2, 4, 6, 8, 10]
    (first,) = (rdir / "tensorboard").iterdir()
    with open(first, "ab") as f:
        f.write(b"\x2a\x00\x00\x00\x00\x00\x00\x00\x01\x02")  # a kill in the middle of writing a record
    capsys.readouterr()
    assert main(_args(out, cache, "brn", "--resume")) == 0
    assert "lack" not in capsys.readouterr().out
    names = sorted(p.name for p in (rdir / "tensorboard").iterdir())
    assert names[0] == KEPT_NAME and len(names) == 2, names  # the kept points, then this session's file
    columns = next(csv.reader(open(rdir / "metrics.csv")))
    events = assert_events_match_metrics(rdir, columns)
    expected = read_events(reference / "runs" / "brn" / "seed0" / "tensorboard")
    events.pop("elapsed_s"), expected.pop("elapsed_s")
    assert events == expected  # the same points as the uninterrupted run


def _session(logdir, resume_step, steps, enabled=True):
    log = EventLog(logdir, enabled=enabled)
    kept = log.start(resume_step)
    for s in steps:
        log.append(s, {"val_accuracy": s / 100, "norm1/rmax": 1.0 + s})
    log.close()
    return kept


def _steps(logdir):
    return {tag: [s for s, _ in pts] for tag, pts in read_events(logdir).items()}


def test_event_log_keeps_the_points_up_to_the_checkpoint(tmp_path):
    d = tmp_path / "tb"
    assert _session(d, 0, [2, 4, 6]) == []
    assert _session(d, 4, [6, 8]) == [2, 4]
    assert _steps(d) == {"val_accuracy": [2, 4, 6, 8], "norm1/rmax": [2, 4, 6, 8]}
    assert read_events(d)["val_accuracy"][2] == (6, pytest.approx(0.06))
    assert _session(d, 8, []) == [2, 4, 6, 8]  # the kept file is itself reconciled
    assert sorted(p.name for p in d.iterdir())[0] == KEPT_NAME
    assert _session(d, 0, [2]) == []  # a run that starts over: no point of the earlier one survives
    assert _steps(d) == {"val_accuracy": [2], "norm1/rmax": [2]}


def test_event_log_disabled_writes_nothing_but_still_drops_later_points(tmp_path):
    d = tmp_path / "tb"
    assert _session(d / "none", 0, [2, 4], enabled=False) == []
    assert not (d / "none").exists()
    _session(d, 0, [2, 4, 6])
    assert _session(d, 2, [4, 6], enabled=False) == [2]
    assert _steps(d) == {"val_accuracy": [2], "norm1/rmax": [2]}


def test_event_log_recovers_from_a_crash_inside_its_own_rewrite(tmp_path):
    d = tmp_path / "tb"
    _session(d, 0, [2, 4, 6])
    # Cut short before the kept points were complete: a partial .kept.tmp next to the old file.
    (d / ".kept.tmp").write_bytes(b"\x00\x01partial")
    assert _session(d, 4, []) == [2, 4]
    assert sorted(p.name for p in d.iterdir()) == [KEPT_NAME]
    # Cut short after the kept points were complete (.kept.ready) and the old files partly deleted:
    # the kept points win, whatever old file is left.
    _session(d, 4, [6])
    (d / KEPT_NAME).replace(d / ".kept.ready")  # what the rewrite of a resume at step 4 had finished
    assert _session(d, 8, [8]) == [2, 4]
    assert _steps(d) == {"val_accuracy": [2, 4, 8], "norm1/rmax": [2, 4, 8]}
    assert not (d / ".kept.ready").exists() and not (d / ".kept.tmp").exists()


def test_no_tensorboard_writes_no_event_files_and_a_later_resume_says_what_they_lack(tmp_path, cache, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--no-tensorboard" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(_args(out, cache, "brn", "--no-tensorboard", "--stop-after", "5", steps=6)) == 0
    rdir = out / "runs" / "brn" / "seed0"
    assert [r["step"] for r in read_metrics(rdir / "metrics.csv")] == [2, 4]
    assert not (rdir / "tensorboard").exists()
    capsys.readouterr()
    assert main(_args(out, cache, "brn", "--resume", steps=6)) == 0  # with events from here on
    assert (
        "[brn seed0] the TensorBoard events lack steps 2..4 (2 evaluations; metrics.csv has them); "
        "continuing" in capsys.readouterr().out
    )
    assert {tag: [s for s, _ in pts] for tag, pts in read_events(rdir / "tensorboard").items()}["val_loss"] == [6]
