"""renorm_repro.config: presets, typed overrides that refuse typos, derived values; the CLI's error path."""

import json

import pytest

from renorm import ClipSchedule
from renorm_repro import config as C
from renorm_repro.cli import main


def test_presets_build_and_derive_the_scaled_paper_schedule():
    for name in C.PRESETS:
        cfg = C.get_config(name)
        d = cfg.derived()
        assert d["schedule"] == ClipSchedule.paper(cfg.steps).to_dict()
        assert d["arms"]["bn_micro"]["schedule"] == ClipSchedule.batch_norm().to_dict()
        assert d["arms"]["bn_32"]["microbatch_size"] == cfg.bn_group
        assert d["train_flops_per_step"] == 3 * d["forward_flops_per_example"] * cfg.batch_size
    seed = C.get_config("seed")
    assert (seed.dataset, seed.microbatch_size, seed.batch_size, seed.steps, len(seed.seeds)) == (
        "cifar100",
        2,
        1600,
        8000,
        5,
    )
    assert seed.momentum == 0.99 and seed.epsilon > 0
    assert seed.derived()["schedule"] == dict(rmax=3.0, dmax=5.0, warmup_steps=250, rmax_steps=2000, dmax_steps=1250)
    assert C.get_config("paper").microbatch_size == 4
    assert C.get_config("quick").dataset == "digits"


def test_overrides_parse_types():
    cfg = C.get_config(
        "smoke",
        overrides=C.parse_override_tokens(
            [
                "--steps",
                "7",
                "--seeds=1,2",
                "--arms",
                "bn_micro",
                "--learning-rate",
                "1e-2",
                "--jit-compile",
                "true",
                "--deterministic",
                "false",
                "--data-dir",
                "none",
                "--rmax",
                "2",
            ]
        ),
    )
    assert (cfg.steps, cfg.seeds, cfg.arms, cfg.learning_rate, cfg.jit_compile, cfg.data_dir, cfg.rmax) == (
        7,
        (1, 2),
        ("bn_micro",),
        1e-2,
        True,
        None,
        2.0,
    )
    assert cfg.derived()["arms"]["bn_micro"]["schedule"]["rmax"] == 1.0


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"stpes": "3"}, r"Unknown config key --stpes .*Did you mean --steps"),
        ({"steps": "3.5"}, r"--steps expects an integer, got '3.5'"),
        ({"jit_compile": "maybe"}, r"--jit_compile expects a boolean .*'maybe'"),
        ({"learning_rate": "fast"}, r"--learning_rate expects a number, got 'fast'"),
        ({"seeds": "0,x"}, r"--seeds expects an integer, got 'x'"),
        ({"optimizer": "sgd"}, r"`optimizer` must be one of .*got optimizer='sgd'"),
        ({"arms": "bn_micro,typo"}, r"`arms` must be distinct names .*'typo'"),
        ({"microbatch_size": "3"}, r"`microbatch_size` must divide batch_size=64, got microbatch_size=3"),
        ({"momentum": "1.0"}, r"`momentum` must be in \[0, 1\)"),
        ({"rmax": "0.5"}, r"rmax=0.5.*`rmax` must be a finite number >= 1"),
        ({"jit_compile": "true"}, r"`jit_compile` cannot be combined with deterministic=True"),
        ({"experiment": "x"}, r"Unknown config key --experiment"),
    ],
)
def test_bad_overrides_are_refused_with_the_key_and_value(overrides, match):
    with pytest.raises(C.ConfigError, match=match):
        C.get_config("smoke", overrides=overrides)


def test_override_token_errors():
    with pytest.raises(C.ConfigError, match="--steps has no value"):
        C.parse_override_tokens(["--steps"])
    with pytest.raises(C.ConfigError, match="Expected an override --key value, got 'steps'"):
        C.parse_override_tokens(["steps", "3"])
    with pytest.raises(C.ConfigError, match="given twice"):
        C.parse_override_tokens(["--steps", "3", "--steps=4"])
    assert C.parse_override_tokens(["--rmax", "-1"]) == {"rmax": "-1"}  # negative numbers are values


def test_config_round_trips_through_json():
    cfg = C.get_config("quick", overrides={"seeds": "4,5"})
    assert C.config_from_dict(json.loads(json.dumps(C.config_to_dict(cfg)))) == cfg


def test_cli_reports_bad_overrides_and_shows_configs(capsys):
    assert main(["run", "--preset", "smoke", "--out", "/tmp/never-written", "--stpes", "3"]) == 2
    assert "Unknown config key --stpes" in capsys.readouterr().err
    assert main(["show", "--preset", "seed", "--steps", "16000"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config"]["steps"] == 16000 and shown["derived"]["schedule"]["warmup_steps"] == 500
    with pytest.raises(SystemExit):
        main(["run", "--preset", "nonsense", "--out", "x"])


# ------------------------------------------------- the Batch Renorm arms' explicit schedule
def test_default_schedule_is_the_paper_scaled_one_and_is_recorded_per_arm():
    cfg = C.get_config("fashion", "iid")
    assert cfg.schedule() == ClipSchedule.paper(cfg.steps)
    d = cfg.derived()
    assert d["arms"]["brn"]["schedule"] == ClipSchedule.paper(4000).to_dict()
    assert d["arms"]["bn"]["schedule"] == ClipSchedule.batch_norm().to_dict()
    assert d["schedule_time_constants"]["warmup"] == 1.25


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # absolute steps, no ramps: the small limits
        (
            {"warmup_steps": "1000", "rmax": "1.5", "dmax": "0.5", "rmax_steps": "0", "dmax_steps": "0"},
            dict(rmax=1.5, dmax=0.5, warmup_steps=1000, rmax_steps=0, dmax_steps=0),
        ),
        # a warm-up in time constants at momentum 0.99 (100 steps each) moves the scaled ramps with it
        (
            {"warmup_time_constants": "10"},
            dict(rmax=3.0, dmax=5.0, warmup_steps=1000, rmax_steps=1875, dmax_steps=1500),
        ),
        # ... and at momentum 0.9 a time constant is 10 steps
        (
            {"warmup_time_constants": "5", "momentum": "0.9"},
            dict(rmax=3.0, dmax=5.0, warmup_steps=50, rmax_steps=925, dmax_steps=550),
        ),
        # explicit ramp ends win over the moved ones
        (
            {"warmup_time_constants": "10", "rmax_steps": "2000", "dmax_steps": "1500"},
            dict(rmax=3.0, dmax=5.0, warmup_steps=1000, rmax_steps=2000, dmax_steps=1500),
        ),
        # the paper's breakpoints unscaled, in a run long enough for them
        (
            {"schedule_base": "paper", "steps": "40000"},
            dict(rmax=3.0, dmax=5.0, warmup_steps=5000, rmax_steps=40000, dmax_steps=25000),
        ),
    ],
)
def test_explicit_schedules(overrides, expected):
    cfg = C.get_config("fashion", "iid", overrides)
    assert cfg.schedule() == ClipSchedule(**expected)
    for arm in ("brn", "keras_brn"):
        assert cfg.arm_spec(arm)["schedule"] == ClipSchedule(**expected)
    assert cfg.arm_spec("bn")["schedule"] == ClipSchedule.batch_norm()
    tau = 10.0 if cfg.momentum == 0.9 else 100.0
    assert cfg.time_constant_steps() == pytest.approx(tau, rel=1e-12)
    assert cfg.derived()["schedule_time_constants"]["warmup"] == pytest.approx(expected["warmup_steps"] / tau)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"warmup_steps": "1000", "rmax_steps": "500"}, r"`rmax_steps` ends the ramp before the warm-up ends.*500"),
        ({"warmup_steps": "1000", "dmax_steps": "1000"}, r"`dmax_steps` ends the ramp before the warm-up"),
        ({"warmup_steps": "1000", "warmup_time_constants": "5"}, r"Give the warm-up once"),
        ({"warmup_steps": "-1"}, r"warmup_steps=-1"),
        ({"warmup_time_constants": "-2"}, r"warmup_time_constants=-2"),
        ({"warmup_time_constants": "nan"}, r"warmup_time_constants=nan"),
        ({"rmax": "0.5"}, r"rmax=0.5"),
        ({"dmax": "-1"}, r"dmax=-1"),
        ({"rmax": "inf"}, r"rmax=inf"),
        ({"warmup_steps": "4000"}, r"warm-up of the Batch Renorm arms \(4000 steps\) must be shorter than the run"),
        ({"warmup_time_constants": "35"}, r"`rmax_steps` is after the end of the run.*moved with the warm-up"),
        ({"schedule_base": "paper"}, r"warm-up .*5000 steps"),
        ({"schedule_base": "scaled"}, r"schedule_base"),
    ],
)
def test_schedule_overrides_that_make_no_sense_are_refused(overrides, match):
    with pytest.raises(C.ConfigError, match=match):
        C.get_config("fashion", "iid", overrides)


def test_cli_show_prints_the_schedule_and_refuses_a_bad_one_in_one_line(capsys):
    assert (
        main(
            [
                "show",
                "--experiment",
                "iid",
                "--preset",
                "fashion",
                "--warmup-steps",
                "1000",
                "--rmax",
                "1.5",
                "--dmax",
                "0.5",
                "--rmax-steps",
                "0",
                "--dmax-steps",
                "0",
            ]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["derived"]["arms"]["brn"]["schedule"] == dict(
        rmax=1.5, dmax=0.5, warmup_steps=1000, rmax_steps=0, dmax_steps=0
    )
    assert shown["config"]["warmup_steps"] == 1000
    assert (
        main(["show", "--experiment", "iid", "--preset", "fashion", "--warmup-steps", "1000", "--rmax-steps", "10"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rmax_steps" in err


def test_old_config_files_without_the_schedule_fields_read_as_the_paper_scaled_schedule():
    cfg = C.get_config("fashion", "iid")
    old = {
        k: v
        for k, v in C.config_to_dict(cfg).items()
        if k not in ("schedule_base", "warmup_steps", "warmup_time_constants", "rmax_steps", "dmax_steps")
    }
    assert C.config_from_dict(old).schedule() == ClipSchedule.paper(4000)
