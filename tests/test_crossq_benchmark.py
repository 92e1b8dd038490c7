"""benchmarks/crossq_torch's bookkeeping (no training: ``train`` is replaced): resume, crash safety, summary."""

import json

import pytest

pytest.importorskip("torch")
from benchmarks import crossq_torch  # noqa: E402
from renorm_repro.stats import mean_ci  # noqa: E402


def fake_return(which, seed):
    return -150.0 - 10.0 * seed - (7.0 + seed if which == "renorm.torch" else 0.0)


@pytest.fixture
def fake(monkeypatch):
    calls = []

    def train(which, seed, steps, eval_episodes):
        calls.append((which, seed))
        r = fake_return(which, seed)
        return {
            "which": which,
            "seed": seed,
            "steps": steps,
            "return_before": -1400.0,
            "return_after": r,
            "return_after_std": 1.0,
            "train_seconds": 2.0,
            "norm_layers": 9,
            "norm_step_counters": [1],
        }

    monkeypatch.setattr(crossq_torch, "train", train)
    monkeypatch.setattr(crossq_torch, "_versions", lambda: {"torch": "t", "sb3_contrib": "s"})
    return calls


def test_a_crash_keeps_the_finished_runs_and_resume_runs_only_the_others(fake, tmp_path):
    out = tmp_path / "c.json"
    argv = ["--seeds", "0,1,2", "--steps", "50", "--out", str(out)]
    orig = crossq_torch.train

    def crash_after_three(which, seed, steps, eval_episodes):  # Ctrl-C during the fourth run
        if len(fake) == 3:
            raise KeyboardInterrupt
        return orig(which, seed, steps, eval_episodes)

    crossq_torch.train = crash_after_three
    with pytest.raises(KeyboardInterrupt):
        crossq_torch.main(argv)
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and len(doc["runs"]) == 3  # nothing finished is lost
    assert [(r["which"], r["seed"]) for r in doc["runs"]] == [
        ("sb3-contrib", 0),
        ("renorm.torch", 0),
        ("sb3-contrib", 1),
    ]
    crossq_torch.train = orig
    fake.clear()
    crossq_torch.main(argv + ["--resume"])
    assert fake == [("renorm.torch", 1), ("sb3-contrib", 2), ("renorm.torch", 2)]
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and len(doc["runs"]) == 6
    diff = doc["summary"]["renorm.torch minus sb3-contrib"]
    expected = [fake_return("renorm.torch", s) - fake_return("sb3-contrib", s) for s in (0, 1, 2)]
    assert diff["differences"] == expected and diff["seeds"] == [0, 1, 2] and diff["wins"] == 0
    assert diff["lo"] == pytest.approx(mean_ci(expected)["lo"])
    assert doc["summary"]["sb3-contrib"]["mean_return"] == pytest.approx(-160.0)


def test_resume_refuses_other_settings_and_a_torn_file(fake, tmp_path):
    out = tmp_path / "c.json"
    crossq_torch.main(["--seeds", "0", "--steps", "50", "--out", str(out)])
    with pytest.raises(SystemExit, match="was written with"):
        crossq_torch.main(["--seeds", "0", "--steps", "60", "--out", str(out), "--resume"])
    out.write_text(out.read_text()[:40])
    with pytest.raises(SystemExit, match="cannot resume from"):
        crossq_torch.main(["--seeds", "0", "--steps", "50", "--out", str(out), "--resume"])


def test_only_a_full_run_writes_the_committed_file_and_threads_are_checked(fake, tmp_path, capsys):
    with pytest.raises(SystemExit):
        crossq_torch.main(["--seeds", "0", "--out", crossq_torch.RESULTS])
    assert "only a full run writes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        crossq_torch.main(["--threads", "0", "--out", str(tmp_path / "c.json")])
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    assert fake == []


def test_the_results_record_the_machine_and_its_load(fake, tmp_path):
    """Not a fixed sentence about the load: benchmarks.common.machine_info() when the file is written."""
    import os

    out = tmp_path / "c.json"
    crossq_torch.main(["--seeds", "0", "--steps", "50", "--out", str(out)])
    machine = json.loads(out.read_text())["machine"]
    assert machine["cpu_count"] == os.cpu_count() and len(machine["load_average"]) == 3
    assert "shared with other jobs" not in out.read_text()
