"""The analysis scripts committed beside the results (results/fashion-mnist/*.py), on runs the test makes."""

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("renorm.tf")

from renorm_repro.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "results" / "fashion-mnist" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_weight_norms_reads_each_runs_last_checkpoint(tmp_path, capsys):
    wn = _script("weight_norms")
    out = tmp_path / "exp"
    assert (
        main(
            [
                "run",
                "--experiment",
                "noniid",
                "--preset",
                "smoke",
                "--arms",
                "bn,brn",
                "--seeds",
                "0,1",
                "--steps",
                "8",
                "--eval-every",
                "2",
                "--checkpoint-every",
                "4",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    wn.main([str(out)])
    lines = capsys.readouterr().out.splitlines()
    rows = [ln for ln in lines if ln.startswith("| exp/runs/")]
    assert [r.split(" | ")[0] for r in rows] == [f"| exp/runs/{arm}/seed{s}" for arm in ("bn", "brn") for s in (0, 1)]
    for row in rows:
        cells = row.strip("| ").split(" | ")
        run = tmp_path / cells[0]
        assert cells[1] == "8"  # the last checkpoint, at the last step
        with open(run / "metrics.csv", newline="") as f:
            vals = [float(r["val_accuracy"]) for r in csv.DictReader(f)]
        assert float(cells[-1]) == pytest.approx(100 * np.mean(vals[-4:]), abs=0.006)
        # Every convolution of the model (4 layers), read back independently of the script.
        ckpt = tf.train.load_checkpoint(str(run / "checkpoints" / "ckpt-8"))
        kernels = sorted(
            (
                k
                for k, s in ckpt.get_variable_to_shape_map().items()
                if k.startswith("optimizer/_trainable_variables/") and len(s) == 4
            ),
            key=lambda k: int(k.split("/")[2]),
        )
        assert len(kernels) == 4 == len(cells) - 3
        for key, cell in zip(kernels, cells[2:-1]):
            assert float(cell) == pytest.approx(np.linalg.norm(ckpt.get_tensor(key)), abs=0.006)
    assert sum("Pearson r" in ln for ln in lines) == 4


def test_weight_norms_stops_with_one_line_without_checkpoints(tmp_path):
    wn = _script("weight_norms")
    with pytest.raises(SystemExit, match="no finished run with a checkpoint"):
        wn.main([str(tmp_path)])


def test_the_multiplicity_count_holds_against_the_committed_logs():
    """results/fashion-mnist/multiplicity.py on the committed folders: every interval either README quotes is
    accounted for, and every main-score one recomputes from the runs' metrics.csv as printed (it exits otherwise)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("reads the committed tables with git ls-files")
    out = subprocess.run(
        [sys.executable, str(ROOT / "results" / "fashion-mnist" / "multiplicity.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    # The bar the results README states is the one the script computes.
    bar = first.split("|t| > ")[1].split()[0]
    readme = (ROOT / "results" / "fashion-mnist" / "README.md").read_text()
    assert first in readme and f"(|t| > {bar})" in readme, first


PRECISE_RERUNS = [  # (rerun, the committed folder it must have trained exactly as)
    ("final/iid-bn-precise", "final/iid-bn"),
    ("final/noniid-bn-precise", "final/noniid-bn"),
    ("final/mbk2-bn-precise-seeds20-22", "final/mbk2-bn"),
    ("final/mbk2-bn-precise-seeds23-24", "final/mbk2-bn"),
]


def test_the_precise_bn_reruns_trained_exactly_as_the_committed_finals(capsys):
    """Every shared metrics.csv column but the wall time equal, every row, every run (the README says so)."""
    same = _script("same_training")
    folder = ROOT / "results" / "fashion-mnist"
    args = [str(folder / d) for pair in PRECISE_RERUNS for d in pair]
    assert same.main(args) == 0, capsys.readouterr().out
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20 and all(ln.startswith("same ") for ln in lines), lines


def test_same_training_names_the_first_difference(tmp_path, capsys):
    same = _script("same_training")
    for name, value in (("a", "0.5"), ("b", "0.25")):
        run = tmp_path / name / "runs" / "bn" / "seed0"
        run.mkdir(parents=True)
        run.joinpath("metrics.csv").write_text(f"step,val_accuracy,elapsed_s\n10,0.9,1.0\n20,{value},{name}\n")
    assert same.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert capsys.readouterr().out.strip() == "DIFFERS a/runs/bn/seed0: row 2, val_accuracy: 0.5 against 0.25"
