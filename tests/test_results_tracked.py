"""Every Fashion-MNIST experiment folder keeps its runs' logs in git, and only them.

A run's metrics.csv, config.json and done.json are what every committed number re-derives from; its
checkpoints, TensorBoard events and lock are not results. (The digits results, results/*/, are 40-100 s runs
committed as summaries only.) A folder whose runs/ the .gitignore hides loses its
logs silently (a new machine gets the summary without the rows it was computed from): this test fails instead.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _experiment_folders():
    # An experiment folder holds a config.json beside its runs/ (a run's own config.json lies under runs/).
    configs = (ROOT / "results" / "fashion-mnist").rglob("config.json")
    return sorted(p.parent for p in configs if "runs" not in p.relative_to(ROOT).parts)


def _ignored(paths):
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        cwd=ROOT,
        input="\n".join(paths) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode not in (0, 1):  # 1: none ignored
        pytest.skip(f"git check-ignore failed: {out.stderr.strip()}")
    return set(out.stdout.split())


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_every_experiment_folder_keeps_its_run_logs_and_ignores_its_checkpoints():
    folders = _experiment_folders()
    assert folders, "no experiment folder under results/fashion-mnist/"
    kept, dropped = [], []
    for f in folders:
        rel = f.relative_to(ROOT).as_posix()
        run = f"{rel}/runs/bn/seed0"
        kept += [f"{run}/metrics.csv", f"{run}/config.json", f"{run}/done.json", f"{rel}/summary.json"]
        dropped += [f"{run}/checkpoints/ckpt-1.index", f"{rel}/.lock", f"{run}/tensorboard/events.out"]
    ignored = _ignored(kept + dropped)
    assert sorted(p for p in kept if p in ignored) == []
    assert sorted(p for p in dropped if p not in ignored) == []
