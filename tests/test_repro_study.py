"""renorm_repro.study: seeds pooled across folders, and the schedule sweep chosen on validation (no TensorFlow)."""

import json
import math

import numpy as np
import pytest

from renorm_repro import study
from renorm_repro.cli import main
from renorm_repro.config import config_to_dict, get_config
from renorm_repro.runs import RunDirError, metric_columns


def _folder(root, cfg, accs, val_offset=-0.01):
    """An experiment folder whose runs evaluate ``accs[arm][seed]`` (test) and that minus 0.01 (val) at every step."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"config": config_to_dict(cfg), "derived": cfg.derived()}))
    cols = metric_columns(cfg)
    for arm, by_seed in accs.items():
        for seed, acc in by_seed.items():
            d = root / "runs" / arm / f"seed{seed}"
            d.mkdir(parents=True)
            lines = [",".join(cols)]
            for step in range(250, cfg.steps + 1, 250):
                row = {c: 0.25 for c in cols}
                row.update(test_accuracy=acc, val_accuracy=acc + val_offset)
                lines.append(",".join(str(step) if c == "step" else repr(row[c]) for c in cols))
            (d / "metrics.csv").write_text("\n".join(lines) + "\n")
            (d / "done.json").write_text("{}")
    return root


def test_sign_test():
    assert study.sign_test_p(5, 5) == pytest.approx(0.0625) and study.sign_test_p(0, 5) == pytest.approx(0.0625)
    assert study.sign_test_p(6, 10) == pytest.approx(2 * sum(math.comb(10, i) for i in range(5)) / 1024)
    assert study.sign_test_p(5, 10) == 1.0 and study.sign_test_p(0, 0) == 1.0
    with pytest.raises(ValueError, match="wins=6"):
        study.sign_test_p(6, 5)


def test_pool_joins_seeds_of_two_folders_and_pairs_them(tmp_path):
    a_cfg = get_config("fashion", "iid", {"arms": "bn,brn,keras_brn", "seeds": "0,1,2"})
    b_cfg = get_config("fashion", "iid", {"arms": "brn,keras_brn", "seeds": "3,4"})
    brn = {0: 0.80, 1: 0.82, 2: 0.84, 3: 0.70, 4: 0.90}
    keras = {0: 0.81, 1: 0.81, 2: 0.86, 3: 0.72, 4: 0.89}
    _folder(
        tmp_path / "a",
        a_cfg,
        {
            "bn": {0: 0.9, 1: 0.9, 2: 0.9},
            "brn": {s: brn[s] for s in (0, 1, 2)},
            "keras_brn": {s: keras[s] for s in (0, 1, 2)},
        },
    )
    _folder(tmp_path / "b", b_cfg, {"brn": {s: brn[s] for s in (3, 4)}, "keras_brn": {s: keras[s] for s in (3, 4)}})
    res = study.pool([tmp_path / "a", tmp_path / "b"])
    s = res["arms"]["brn"]["scalars"]["test_last4"]
    assert s["n"] == 5 and s["mean"] == pytest.approx(np.mean(list(brn.values())))
    assert res["arms"]["bn"]["scalars"]["test_last4"]["n"] == 3
    p = next(p for p in res["paired"] if (p["a"], p["b"], p["scalar"]) == ("brn", "keras_brn", "test_last4"))
    diffs = [keras[k] - brn[k] for k in range(5)]
    assert p["seeds"] == [0, 1, 2, 3, 4] and p["wins"] == 3
    np.testing.assert_allclose(p["differences"], diffs, atol=1e-12)
    assert p["hi"] - p["mean"] == pytest.approx(2.776445 * np.std(diffs, ddof=1) / np.sqrt(5))
    assert p["sign_test_p"] == pytest.approx(study.sign_test_p(3, 5))
    text = study.pool_table(res)
    assert "0,1,2 (a); 3,4 (b)" in text and f"{p['mean'] * 100:.2f} [{p['lo'] * 100:.2f}" in text


def test_pool_curves_and_figure_read_every_evaluation_of_the_complete_runs(tmp_path, capsys):
    cfg = get_config("fashion", "iid", {"arms": "bn,brn", "seeds": "0,1", "steps": "1000"})
    _folder(tmp_path / "a", cfg, {"bn": {0: 0.9, 1: 0.8}, "brn": {0: 0.85, 1: 0.86}})
    b_cfg = get_config("fashion", "iid", {"arms": "bn,brn", "seeds": "2,3", "steps": "1000"})
    _folder(tmp_path / "b", b_cfg, {"bn": {2: 0.7, 3: 0.75}, "brn": {2: 0.72, 3: 0.5}})
    (tmp_path / "b" / "runs" / "brn" / "seed3" / "done.json").unlink()  # unfinished: left out
    res = study.pool([tmp_path / "a", tmp_path / "b"])
    curves = study.pool_curves(res)
    assert curves["column"] == "test_accuracy"
    assert sorted(curves["arms"]["bn"]) == [0, 1, 2, 3] and sorted(curves["arms"]["brn"]) == [0, 1, 2]
    steps, acc = curves["arms"]["bn"][1]
    assert steps == [250, 500, 750, 1000] and acc == [0.8] * 4
    assert curves["arms"]["brn"][2][1] == [0.72] * 4
    steps, d = study.paired_curve(curves["arms"]["bn"], curves["arms"]["brn"])  # seeds 0, 1, 2: brn's
    assert steps == [250, 500, 750, 1000]
    np.testing.assert_allclose(d, [[0.85 - 0.9] * 4, [0.86 - 0.8] * 4, [0.72 - 0.7] * 4], atol=1e-12)
    short = {0: ([250, 500], [0.1, 0.2])}
    steps, d = study.paired_curve(short, {0: ([250, 500, 750], [0.3, 0.5, 0.9]), 9: ([250], [0.0])})
    assert steps == [250, 500] and np.allclose(d, [[0.2, 0.3]])
    with pytest.raises(RunDirError, match="share no seed"):
        study.paired_curve(short, {1: ([250], [0.0])})
    paths = study.plot_pool(res, tmp_path / "pool.png")
    assert [p.name for p in paths] == ["pool.png", "pool.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in paths[1].read_bytes()[:400]
    assert main(["pool", str(tmp_path / "a"), str(tmp_path / "b"), "--figure", str(tmp_path / "out.png")]) == 0
    assert "figures: " in capsys.readouterr().out and (tmp_path / "out.svg").is_file()
    # redrawn from the same logs: the same bytes (no date in the SVG, fixed ids), so git sees no change
    assert [p.read_bytes() for p in study.plot_pool(res, tmp_path / "again.png")] == [p.read_bytes() for p in paths]


def test_pool_refuses_other_experiments_and_seeds_given_twice(tmp_path):
    cfg = get_config("fashion", "iid", {"arms": "bn", "seeds": "0,1"})
    _folder(tmp_path / "a", cfg, {"bn": {0: 0.9, 1: 0.9}})
    _folder(
        tmp_path / "b",
        get_config("fashion", "iid", {"arms": "bn", "seeds": "0,1", "momentum": "0.9"}),
        {"bn": {0: 0.9, 1: 0.9}},
    )
    with pytest.raises(RunDirError, match=r"config differs in momentum \(0.99 vs 0.9\)"):
        study.pool([tmp_path / "a", tmp_path / "b"])
    _folder(tmp_path / "c", get_config("fashion", "iid", {"arms": "bn", "seeds": "1,2"}), {"bn": {1: 0.9, 2: 0.9}})
    with pytest.raises(RunDirError, match="seed 1 in two folders"):
        study.pool([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(RunDirError, match="at least 2 folders"):
        study.pool([tmp_path / "a"])


def _sweep_folders(tmp_path):
    seeds = {10: 0.0, 11: 0.01}
    ref = _folder(
        tmp_path / "bn",
        get_config("fashion", "iid", {"arms": "bn", "seeds": "10,11"}),
        {"bn": {s: 0.90 + o for s, o in seeds.items()}},
    )
    folders = []
    # val and test disagree on purpose: the best on test (tau 20) is not the best on validation (tau 10)
    for tau, lim, acc, val_offset in (
        (1.25, (3, 5), 0.87, -0.01),
        (10, (1.5, 0.5), 0.895, -0.001),
        (20, (1.5, 0.5), 0.899, -0.02),
    ):
        cfg = get_config(
            "fashion",
            "iid",
            {
                "arms": "brn",
                "seeds": "10,11",
                "warmup_time_constants": str(tau),
                "rmax": str(lim[0]),
                "dmax": str(lim[1]),
            },
        )
        folders.append(
            _folder(tmp_path / f"tau{tau}", cfg, {"brn": {s: acc + o for s, o in seeds.items()}}, val_offset=val_offset)
        )
    return ref, folders


def test_sweep_chooses_on_validation_never_on_test(tmp_path):
    ref, folders = _sweep_folders(tmp_path)
    res = study.sweep(folders, ref)
    assert res["configurations"] == 3 and res["chosen"] == "tau10"  # tau20 is higher on test, lower on val
    best_test = max(res["rows"], key=lambda r: r["test_last4"]["mean"])["name"]
    assert best_test == "tau20"
    row = next(r for r in res["rows"] if r["name"] == "tau10")
    assert row["schedule"]["warmup_steps"] == 1000 and row["warmup_time_constants"] == 10
    d = row["val_last4_minus_reference"]
    assert d["mean"] == pytest.approx(0.894 - 0.89) and d["wins"] == 2
    text = study.sweep_table(res)
    assert "**tau10**" in text and "3 configurations" in text and "10 (1000 steps)" in text
    paths = study.plot_sweep(res, tmp_path / "sweep")
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RunDirError, match="validation scalar"):
        study.sweep(folders, ref, select="test_last4")
    with pytest.raises(RunDirError, match="exactly one Batch Renorm arm"):
        study.sweep([ref], ref)


def test_pool_and_sweep_commands(tmp_path, capsys):
    ref, folders = _sweep_folders(tmp_path)
    table = tmp_path / "out" / "sweep.md"
    table.parent.mkdir()
    assert (
        main(
            [
                "sweep",
                *map(str, folders),
                "--reference",
                str(ref),
                "--table",
                str(table),
                "--figure",
                str(tmp_path / "out" / "sweep.png"),
            ]
        )
        == 0
    )
    assert "**tau10**" in table.read_text() and json.loads(table.with_suffix(".json").read_text())["chosen"] == "tau10"
    assert (tmp_path / "out" / "sweep.svg").is_file()
    capsys.readouterr()
    # batch norm reads no schedule: the reference pools with a configuration (the schedule shown differing) ...
    assert main(["pool", str(ref), str(folders[0])]) == 0
    assert "The configs differ in `warmup_time_constants` (None in bn; 1.25 in tau1.25)" in capsys.readouterr().out
    # ... but two configurations hold the same arm under two schedules: refused, in one line.
    assert main(["pool", str(folders[0]), str(folders[1])]) == 1
    err = capsys.readouterr().err
    assert "arm 'brn' is not the same" in err and len(err.strip().splitlines()) == 1


def test_pool_joins_folders_that_differ_only_in_what_their_arms_do_not_read(tmp_path):
    """Groups of 32 run once (in a k=2 folder) pool with the k=4 folders; a k=2 and a k=4 bn_micro do not."""
    mb = {"seeds": "20,21,22"}
    k2 = get_config("fashion", "microbatch", dict(mb, arms="bn_32,bn_micro", microbatch_size="2"))
    k4 = get_config("fashion", "microbatch", dict(mb, arms="brn_micro", microbatch_size="4"))
    g32, brn4 = {20: 0.90, 21: 0.91, 22: 0.92}, {20: 0.93, 21: 0.91, 22: 0.95}
    _folder(tmp_path / "k2", k2, {"bn_32": g32, "bn_micro": {20: 0.5, 21: 0.5, 22: 0.5}})
    _folder(tmp_path / "k4", k4, {"brn_micro": brn4})
    res = study.pool([tmp_path / "k2", tmp_path / "k4"])
    assert res["differs"] == {"microbatch_size": {str(tmp_path / "k2"): 2, str(tmp_path / "k4"): 4}}
    p = next(p for p in res["paired"] if (p["a"], p["b"], p["scalar"]) == ("bn_32", "brn_micro", "test_last4"))
    np.testing.assert_allclose(p["differences"], [brn4[s] - g32[s] for s in (20, 21, 22)], atol=1e-12)
    assert res["arms"]["brn_micro"]["label"] == "Batch Renorm, micro-batch 4"
    assert "differ in `microbatch_size` (2 in k2; 4 in k4)" in study.pool_table(res)
    # The same arm under two micro-batch sizes is two arms: refused, naming it.
    k4_bn = get_config("fashion", "microbatch", {"seeds": "23", "arms": "bn_micro", "microbatch_size": "4"})
    _folder(tmp_path / "k4bn", k4_bn, {"bn_micro": {23: 0.6}})
    with pytest.raises(RunDirError, match="arm 'bn_micro' is not the same in .*k4bn as in .*k2.*microbatch_size"):
        study.pool([tmp_path / "k2", tmp_path / "k4bn"])
    # A field that the training reads (here the width) is never poolable, even beside an arm-only one.
    wide = get_config("fashion", "microbatch", dict(mb, arms="brn_micro", microbatch_size="4", width="8"))
    _folder(tmp_path / "wide", wide, {"brn_micro": brn4})
    with pytest.raises(RunDirError, match=r"differs in width \(16 vs 8\)"):
        study.pool([tmp_path / "k2", tmp_path / "wide"])


def test_pool_takes_chosen_arms_from_a_folder(tmp_path, capsys):
    """Batch norm from a folder whose Batch Renorm ran another schedule, pooled with that arm under a new one."""
    long = get_config("fashion", "iid", {"arms": "bn,brn", "seeds": "0,1"})
    new = get_config("fashion", "iid", {"arms": "brn", "seeds": "0,1", "warmup_steps": "1000", "rmax": "1.5"})
    _folder(tmp_path / "long", long, {"bn": {0: 0.80, 1: 0.82}, "brn": {0: 0.5, 1: 0.5}})
    _folder(tmp_path / "new", new, {"brn": {0: 0.85, 1: 0.90}})
    with pytest.raises(RunDirError, match="arm 'brn' is not the same"):
        study.pool([tmp_path / "long", tmp_path / "new"])
    res = study.pool([tmp_path / "long", tmp_path / "new"], arms_of={tmp_path / "long": ["bn"]})
    assert res["arms"]["brn"]["folders"] == {str(tmp_path / "new"): [0, 1]}  # not the long folder's 0.5s
    p = next(p for p in res["paired"] if (p["a"], p["b"], p["scalar"]) == ("bn", "brn", "test_last4"))
    np.testing.assert_allclose(p["differences"], [0.05, 0.08], atol=1e-12)
    assert study.pool_curves(res)["arms"]["brn"][0][1] == [0.85] * (new.steps // 250)
    assert "Taken from `long`: `bn` only." in study.pool_table(res)
    with pytest.raises(RunDirError, match="arm 'bn_iid' is not in"):
        study.pool([tmp_path / "long", tmp_path / "new"], arms_of={tmp_path / "long": ["bn_iid"]})
    with pytest.raises(RunDirError, match="not one of the pooled folders"):
        study.pool([tmp_path / "long", tmp_path / "new"], arms_of={tmp_path / "other": ["bn"]})
    folders = [str(tmp_path / "long"), str(tmp_path / "new")]
    assert main(["pool", *folders, "--arms-of", f"{tmp_path / 'long'}=bn"]) == 0
    assert "Taken from `long`" in capsys.readouterr().out
    assert main(["pool", *folders, "--arms-of", "bn"]) == 2
    assert "--arms-of` takes FOLDER=ARMS" in capsys.readouterr().err
