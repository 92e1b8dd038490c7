"""The command line as a researcher meets it (issue 22): errors before imports, resume changes nothing,
provenance appended, ``--resume`` reads the folder's config and extends a run by ``--steps``, ``--help``,
``show``'s cost, progress bars only on a terminal.

Runs train in-process (``main([...])``) on the i.i.d. smoke preset; the timing tests start the real command.
"""

import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from renorm_repro import config as C
from renorm_repro.cli import main

ROOT = Path(__file__).resolve().parents[1]
REPRO = [sys.executable, "-m", "renorm_repro.cli"]


def _repro(*args, timeout=120, cwd=None):
    return subprocess.run([*REPRO, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------- item 3: every config error before the imports
BAD_COMMANDS = [
    (["run", "--preset", "smoke", "--out", "{tmp}/o", "--stpes", "1"], 2, "Unknown config key --stpes"),
    (["run", "--preset", "smoke", "--out", "{tmp}/o", "--steps", "ten"], 2, "--steps expects an integer"),
    (["run", "--preset", "smoke", "--out", "{tmp}/o", "--dataset", "mnist"], 2, "`dataset` must be one of"),
    (["run", "--preset", "smoke", "--out", "{tmp}/o", "--epsilon", "-1"], 2, "`epsilon` must be > 0"),
    (["run", "--preset", "smoke", "--out", "{tmp}/o", "--stop-after", "0"], 2, "--stop-after must be >= 1"),
    (["run", "--preset", "smoke", "--out", "{tmp}/o", "--log-interval", "-1"], 2, "--log-interval must be >= 0"),
    (["run", "--preset", "smoke", "--out", "{tmp}/o", "--log-interval", "nan"], 2, "--log-interval must be >= 0"),
    (["run", "--out", "{tmp}/o"], 2, "`run` needs --preset"),
    (["run", "--preset", "smoke", "--out", "{tmp}/o", "--resume"], 1, "does not exist, so there is nothing"),
    (["run", "--preset", "smoke", "--out", "{existing}"], 1, "already holds an experiment"),
    (["run", "--preset", "quick", "--out", "{existing}", "--resume"], 1, "the config differs"),
    (["run", "--out", "{existing}", "--resume", "--steps", "24"], 1, "cannot continue exactly"),
    (["run", "--out", "{existing}", "--resume", "--experiment", "iid"], 2, "holds a microbatch experiment"),
    (["bench", "--preset", "smoke", "--bench-steps", "0"], 2, "--bench-steps must be >= 1"),
    (["bench", "--preset", "smoke", "--arm", "nope"], 2, "--arm must be one of"),
]


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A folder holding a (microbatch smoke) experiment whose runs have started: its config and one log."""
    out = tmp_path_factory.mktemp("existing") / "out"
    cfg = C.get_config("smoke")
    (out / "runs" / "bn_micro" / "seed0").mkdir(parents=True)
    (out / "runs" / "bn_micro" / "seed0" / "metrics.csv").write_text("step\n")
    (out / "config.json").write_text(json.dumps({"config": C.config_to_dict(cfg), "derived": cfg.derived()}))
    return out


@pytest.mark.parametrize("argv, code, text", BAD_COMMANDS, ids=[" ".join(a[:1] + a[-2:]) for a, _, _ in BAD_COMMANDS])
def test_config_errors_come_before_tensorflow_is_imported(tmp_path, existing, argv, code, text):
    argv = [a.format(tmp=tmp_path, existing=existing) for a in argv]
    before = sorted(p.name for p in existing.rglob("*"))
    script = (
        "import sys, time; t0 = time.perf_counter(); from renorm_repro.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, 'tensorflow' in sys.modules, 'jax' in sys.modules, time.perf_counter() - t0)"
    )
    res = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    rc, tf_loaded, jax_loaded, seconds = res.stdout.split()[-4:]
    assert int(rc) == code, res.stderr
    assert tf_loaded == "False" and jax_loaded == "False"
    line = _one_line(res.stderr)
    assert line.startswith("renorm-repro: error: ") and text in line, line
    assert float(seconds) < 1.5, seconds
    assert sorted(p.name for p in existing.rglob("*")) == before and not (tmp_path / "o").exists()


def test_the_real_command_reports_a_typo_in_under_two_seconds(tmp_path):
    t0 = time.perf_counter()
    res = _repro("run", "--preset", "smoke", "--out", str(tmp_path / "o"), "--stpes", "1")
    elapsed = time.perf_counter() - t0
    assert res.returncode == 2 and "Unknown config key --stpes" in _one_line(res.stderr)
    assert elapsed < 2.0, elapsed  # ~0.5 s here, on a loaded 2-core machine


@pytest.mark.parametrize("argv", [["run", "--preset", "smoke", "--out", "{tmp}/o"], ["bench", "--preset", "smoke"]])
def test_without_tensorflow_the_command_says_in_one_line_what_to_install(tmp_path, argv):
    """Installed without the [repro] extra (TensorFlow hidden here): one line naming the extra, exit 2, nothing
    written, no traceback (issue 34 item 5). The real command: ``main()`` reads sys.argv and leaves by os._exit."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    script = (
        "import sys; sys.modules['tensorflow'] = None; sys.argv = ['renorm-repro'] + sys.argv[1:]; "
        "from renorm_repro.cli import main; main()"
    )
    res = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    line = _one_line(res.stderr)
    assert line.startswith("renorm-repro: error: ") and "tensorflow" in line, line
    assert line.endswith("pip install 'renorm[repro]'"), line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- item 4: --help and show
def test_run_help_gives_every_option_help_type_allowed_values_and_the_presets_value(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--preset", "quick", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    cls = C.EXPERIMENTS["microbatch"]
    cfg = C.get_config("quick")
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name == "experiment":
            continue
        opt = "--" + f.name.replace("_", "-")
        row = next((ln for ln in lines if ln.strip().startswith(opt + " ")), None)
        assert row is not None, opt
        help_text = row.split("  ")[-1].strip()
        assert len(row.split()) >= 4 and help_text, row  # option, type, value, help
    for opt, allowed in (
        ("--dataset", C.DATASETS),
        ("--optimizer", C.OPTIMIZERS),
        ("--precision", C.PRECISIONS),
        ("--strategy", C.STRATEGIES),
        ("--lr-schedule", C.LR_SCHEDULES),
    ):
        block = text[text.index(f"  {opt} ") :]
        block = block[: block.index("\n  --", 3)]
        assert all(a in block for a in allowed), (opt, block)
    steps_row = next(ln for ln in lines if ln.strip().startswith("--steps "))
    assert f" {cfg.steps} " in steps_row + " " and "8000" not in steps_row, steps_row  # the preset's value
    for opt in ("--preset", "--out", "--resume", "--no-progress", "--stop-after"):
        row = next(ln for ln in lines if ln.strip().startswith(opt))
        assert len(row.strip()) > len(opt) + 10 or lines[lines.index(row) + 1].strip(), row


def test_top_level_help_prints_its_description_once_without_markup_and_names_every_preset(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text
    first = "run the paper's experiments and plot them"
    assert text.count(first) == 1
    for preset in C.preset_names():
        assert f"{preset}" in text, preset


def test_show_states_the_cost_and_the_download(capsys):
    assert main(["show", "--preset", "seed"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    assert cost["steps_per_run"] == 8000 and cost["runs"] == 15
    assert 80 < cost["cpu_hours_estimate"] < 100  # docs/repro.md's preset table: 92 h
    assert 0.3 < cost["gpu_hours_estimate"][0] < cost["gpu_hours_estimate"][1] < 1.0
    assert cost["download"].startswith(("yes: the CIFAR-100 archive", "no ("))
    assert main(["show", "--preset", "quick"]) == 0
    assert json.loads(capsys.readouterr().out)["cost"]["download"].startswith("no (")


# ------------------------------------------------------------- items 2 and 7: resume
def _iid(out, *extra):
    return ["run", "--experiment", "iid", "--preset", "smoke", "--out", str(out), "--no-progress", *extra]


EXTENDABLE = (
    "--warmup-steps",
    "1",
    "--rmax-steps",
    "4",
    "--dmax-steps",
    "3",
    "--eval-every",
    "3",
    "--checkpoint-every",
    "3",
)


def _rows(out, arm="brn"):
    with open(Path(out) / "runs" / arm / "seed0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("elapsed_s")
    return rows


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    pytest.importorskip("tensorflow")
    out = tmp_path_factory.mktemp("finished") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(_iid(out, "--cache-dir", str(out.parent / "cache"), *EXTENDABLE)) == 0
    (out.parent / "stdout.txt").write_text(buf.getvalue())
    return out


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def _committed_copy(src, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(src, repo / "exp")
    _git(repo, "init", "-q")
    _git(repo, "add", "exp")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    return repo


def test_resume_of_a_complete_committed_experiment_leaves_git_status_clean(finished, tmp_path, capsys):
    repo = _committed_copy(finished, tmp_path)
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(repo / "exp")]) == 0
    out = capsys.readouterr().out
    assert _one_line(out).endswith(
        f"nothing to do, no file changed (`renorm-repro plot --out {repo / 'exp'}` rewrites the report)."
    )
    assert _git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    # The same command with the preset and overrides repeated says the same.
    assert main(_iid(repo / "exp", "--resume", "--cache-dir", str(finished.parent / "cache"), *EXTENDABLE)) == 0
    assert "no file changed" in capsys.readouterr().out
    assert _git(repo, "status", "--porcelain", "--untracked-files=all") == ""


def test_resume_of_the_committed_results_iid_changes_nothing(tmp_path):
    repo = _committed_copy(ROOT / "results" / "iid", tmp_path)
    res = _repro("run", "--experiment", "iid", "--preset", "digits", "--out", str(repo / "exp"), "--resume")
    assert res.returncode == 0, res.stderr
    line = _one_line(res.stdout)
    assert "nothing to resume, no file changed" in line and "new --out" in line, line
    assert _git(repo, "status", "--porcelain", "--untracked-files=all") == ""


def test_versions_json_records_every_invocation_that_trained(tmp_path, capsys):
    pytest.importorskip("tensorflow")
    out = tmp_path / "out"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(_iid(out, *cache, "--arms", "brn", "--stop-after", "4")) == 0
    first = json.loads((out / "versions.json").read_text())
    assert "later_invocations" not in first and first["packages"]["tensorflow"]
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "versions.json").read_text())
    assert {k: v for k, v in record.items() if k != "later_invocations"} == first  # the first one is kept
    assert len(record["later_invocations"]) == 1
    assert (
        record["later_invocations"][0]["command"][-3:] == ["--resume", "--out", str(out), "--no-progress"][-3:]
        or record["later_invocations"][0]["packages"]
    )
    run_record = json.loads((out / "runs" / "brn" / "seed0" / "versions.json").read_text())
    assert len(run_record["later_invocations"]) == 1


def test_versions_record_the_thread_settings_and_the_cpu(monkeypatch):
    """The thread pools change a run's arithmetic, so every record says how they were sized."""
    from renorm_repro.runs import THREAD_VARIABLES, versions

    for k in THREAD_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    v = versions()
    assert v["threads"] == {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": None, "OMP_NUM_THREADS": None}
    assert v["cpu_count"] >= 1 and (v["cpu"] is None or isinstance(v["cpu"], str))


def test_resume_reads_the_config_from_the_folder_and_refuses_changes(finished, tmp_path, capsys):
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(finished), "--width", "4"]) == 1
    err = _one_line(capsys.readouterr().err)
    assert "the config differs" in err and "width: 2 -> 4" in err


def test_resume_steps_extends_a_finished_run_exactly(finished, tmp_path, capsys):
    work = tmp_path / "ext"
    shutil.copytree(finished, work)
    assert main(["run", "--resume", "--out", str(work), "--steps", "9", "--no-progress"]) == 0
    assert "extending the experiment" in capsys.readouterr().out
    ref = tmp_path / "ref"
    assert main(_iid(ref, "--cache-dir", str(finished.parent / "cache"), *EXTENDABLE, "--steps", "9")) == 0
    for arm in ("bn", "brn"):
        assert _rows(work, arm) == _rows(ref, arm), arm
    assert json.loads((work / "config.json").read_text())["config"]["steps"] == 9
    # Complete at 9 now: resuming it again changes nothing.
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(work)]) == 0
    assert "no file changed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, why",
    [
        ((), "schedule_base=paper_scaled scales the breakpoints"),
        (("--lr-schedule", "cosine"), "the learning rate depends on steps"),
        (EXTENDABLE[:6] + ("--eval-every", "4", "--checkpoint-every", "3"), "is not an evaluation step"),
    ],
)
def test_resume_steps_is_refused_when_the_run_would_have_differed(tmp_path, extra, why, capsys):
    cfg = C.get_config("smoke", "iid", C.parse_override_tokens(list(extra)))
    out = tmp_path / "out"
    (out / "runs" / "bn" / "seed0").mkdir(parents=True)
    (out / "runs" / "bn" / "seed0" / "metrics.csv").write_text("step\n")
    (out / "config.json").write_text(json.dumps({"config": C.config_to_dict(cfg), "derived": cfg.derived()}))
    before = (out / "config.json").read_bytes()
    assert main(["run", "--resume", "--out", str(out), "--steps", "12"]) == 1
    err = _one_line(capsys.readouterr().err)
    assert why in err and "Nothing was changed" in err, err
    assert (out / "config.json").read_bytes() == before


# ------------------------------------------------------------- item 6: progress bars
@pytest.mark.parametrize(
    "tty, flag, expected", [(False, [], False), (True, [], True), (True, ["--no-progress"], False)]
)
def test_progress_bars_only_on_a_terminal(tmp_path, monkeypatch, tty, flag, expected):
    import renorm_repro.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "run_experiment", lambda cfg, out, **kw: seen.update(kw))
    monkeypatch.setattr(cli, "_quiet_tensorflow", lambda: None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert main(["run", "--preset", "smoke", "--out", str(tmp_path / "o"), *flag]) == 0
    assert seen["progress"] is expected


@pytest.mark.slow
def test_no_progress_bar_when_stderr_is_not_a_terminal(finished, tmp_path):
    pytest.importorskip("tensorflow")
    res = _repro(
        "run",
        "--experiment",
        "iid",
        "--preset",
        "smoke",
        "--out",
        str(tmp_path / "o"),
        "--arms",
        "bn",
        "--cache-dir",
        str(finished.parent / "cache"),
        timeout=300,
    )  # no --no-progress
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stdout + res.stderr
    assert "it/s" not in res.stderr


# ------------------------------------------------------------- item 5: the finding, bounded intervals
def _fake_experiment(out, finals):
    """An i.i.d. smoke experiment folder with hand-written logs: arm -> final val_accuracy per seed."""
    from renorm_repro.runs import MetricsLog, metric_columns, run_dir

    cfg = C.get_config("smoke", "iid", {"seeds": "0,1,2", "arms": "bn,brn"})
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"config": C.config_to_dict(cfg), "derived": cfg.derived()}))
    for arm, values in finals.items():
        for seed, final in zip(cfg.seeds, values):
            rdir = run_dir(out, arm, seed)
            rdir.mkdir(parents=True)
            log = MetricsLog(rdir / "metrics.csv", metric_columns(cfg))
            log.start()
            for step, acc in ((3, 0.2 if arm == "bn" else final), (6, final)):
                log.append({c: 0.5 for c in log.columns} | {"step": step, "val_accuracy": acc})
            (rdir / "done.json").write_text(json.dumps({"final_step": 6}))
    return cfg


def test_summary_states_the_finding_first_with_intervals_bounded_to_accuracies(tmp_path):
    from renorm_repro.report import write_report

    out = tmp_path / "exp"
    _fake_experiment(out, {"bn": [1.0, 1.0, 0.8], "brn": [1.0, 0.9, 1.0]})
    report = write_report(out)
    text = (out / "summary.md").read_text()
    first = text.splitlines()[2]
    assert first.startswith("**Finding (Batch Renorm") and "within noise" in first, first
    assert "reached 50% in 3 steps vs 6 for" in first, first
    assert report["aggregate"]["finding"] in first
    import re

    numbers = [float(x) for x in re.findall(r"\[(-?[\d.]+), (-?[\d.]+)\]", text) for x in x]
    assert numbers and all(-100.0 <= v <= 100.0 for v in numbers), numbers
    assert "†" in text and "clipped to [0, 100]" in text  # the t interval of bn (93.33 +- 28.7) went past 100
    assert "93.33 [64.65, 100.00]†" in text, text  # bn's final: 93.33 +- 28.68 by the t interval
    # the footnote names only the scalars the table shows
    foot = next(ln for ln in text.splitlines() if ln.startswith("Scalars per complete run"))
    assert "lag_max" not in foot and "r_clipped_mean_late" not in foot


def test_the_run_ends_with_the_finding_in_the_terminal(finished):
    last = (finished.parent / "stdout.txt").read_text().strip().splitlines()[-1]
    assert last.startswith("Finding (Batch Renorm") and "final accuracy" in last, last


def test_the_multiworker_error_points_at_a_section_that_exists(monkeypatch):
    """strategy=multiworker without TF_CONFIG names docs/distributed.md and its sections (the README's moved there)."""
    pytest.importorskip("tensorflow")
    import re

    from renorm_repro import train
    from renorm_repro.runs import RunDirError

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setattr(train, "_MULTIWORKER", [])
    with pytest.raises(RunDirError) as e:
        train._strategy("multiworker")
    page, section, paragraph = re.search(r"see (\S+), '([^']+)', '([^']+)'", str(e.value)).groups()
    text = (ROOT / page).read_text()
    assert f"\n## {section}\n" in text and f"**{paragraph}.**" in text.split(f"\n## {section}\n")[1].split("\n## ")[0]


def test_a_new_config_field_is_one_declaration(tmp_path, capsys, monkeypatch):
    """Issue 33: a field declared with config_field (and nothing else) has its --help line (type, value, help,
    allowed values), its override (parsed and checked by its type and choices), its place in show and in
    config.json, and reads back from it."""
    import dataclasses

    from renorm_repro.runs import write_experiment_record

    @dataclasses.dataclass(frozen=True)
    class Extended(C.IidConfig):
        experiment: str = "iid_extended"
        new_knob: int = C.config_field(3, "a knob this test adds")
        new_mode: str = C.config_field("a", "a mode this test adds", ("a", "b"))

    monkeypatch.setitem(C.EXPERIMENTS, "iid_extended", Extended)
    monkeypatch.setitem(C.PRESETS_BY_EXPERIMENT, "iid_extended", C.PRESETS_BY_EXPERIMENT["iid"])
    with pytest.raises(SystemExit):
        main(["run", "--experiment", "iid_extended", "--preset", "smoke", "--help"])
    text = capsys.readouterr().out
    assert "  --new-knob                 INT        3                a knob this test adds\n" in text
    assert "  --new-mode                 STR        a                a mode this test adds {a, b}\n" in text
    show = ["show", "--experiment", "iid_extended", "--preset", "smoke"]
    assert main([*show, "--new-knob", "7", "--new-mode", "b"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["new_knob"], config["new_mode"], config["steps"]) == (7, "b", 6)  # the smoke preset's steps
    assert main([*show, "--new-knob", "x"]) == 2
    assert "--new-knob expects an integer, got 'x'" in _one_line(capsys.readouterr().err)
    assert main([*show, "--new-mode", "c"]) == 2
    assert "`new_mode` must be one of ('a', 'b'), got new_mode='c'" in _one_line(capsys.readouterr().err)
    cfg = C.get_config("smoke", "iid_extended", {"new_knob": "5"})
    out = write_experiment_record(tmp_path / "out", cfg, "new")
    stored = json.loads((out / "config.json").read_text())["config"]
    assert stored["new_knob"] == 5 and C.config_from_dict(stored) == cfg
