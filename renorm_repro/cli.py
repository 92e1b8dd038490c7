"""``renorm-repro``: run the paper's experiments and plot them.

Usage::

    renorm-repro run  --preset quick --out runs/quick [--experiment microbatch] [--resume] [--key value ...]
    renorm-repro run  --experiment noniid --preset digits --out runs/noniid   # Figure 3 (section 4.3)
    renorm-repro run  --experiment iid --preset digits --out runs/iid         # Figure 1 (section 4.1)
    renorm-repro plot --out runs/quick
    renorm-repro show --preset seed [--key value ...]     # print the config and derived values
    renorm-repro bench --preset seed --bench-steps 5      # steps/s of one arm on random data, time estimates
    renorm-repro compare --a OUT1 --b OUT2 [--arms brn,bn] [--figure F.png]  # one factor changed, paired by seed

``run`` trains every arm x seed of the experiment (each into its own
directory), then aggregates and plots. ``plot`` reads only the logs in
``--out``. Any config field is an override: ``--steps 100``, ``--seeds 0,1``,
``--arms bn_micro,brn_micro``, ``--dataset cifar100 --data-dir PATH``; unknown
keys and wrong types are refused (``run --help`` lists every field). Options
are never abbreviated. Experiments: ``microbatch`` (Figure 2, the default),
``noniid`` (Figure 3), ``iid`` (Figure 1); each has the presets ``paper``,
``quick``, ``digits`` (the committed results), ``fashion`` (Fashion-MNIST,
results/fashion-mnist) and ``smoke``; the microbatch experiment also ``seed``
(CIFAR-100). ``show`` prints a preset's config, derived values and cost
(FLOPs, CPU and GPU time estimates, whether data is downloaded).

A run killed at any point (Ctrl-C, ``kill -9``, a crash) continues with
``--resume`` (the folder's config.json is used; ``--preset`` and the overrides
need not be repeated, ``--steps N`` extends a finished run when that is exactly
a longer run); it ends with the metrics of an uninterrupted run. ``--resume``
of a complete experiment changes no file. One process at a time writes into an ``--out`` folder (``OUT/.lock``).
Each run also writes TensorBoard event files (``tensorboard --logdir
OUT/runs``; ``--no-tensorboard`` turns them off), kept consistent with
``metrics.csv`` on ``--resume``.
TensorFlow's start-up log lines are hidden unless ``--tf-logs`` is given (or
``TF_CPP_MIN_LOG_LEVEL`` is set). Errors are one line ``renorm-repro: error:
...`` (exit 2: a bad command line or config; 1: data, folders, files), and
come before TensorFlow is imported where the command line decides them;
Ctrl-C (SIGINT) or SIGTERM at any moment prints one line and exits with 130 or
143. Progress bars are drawn only when stderr is a terminal.
"""

from __future__ import annotations

import os
import sys

from renorm_repro import interrupts as _interrupts


def _is_command() -> bool:
    """Whether this process is the ``renorm-repro`` command (the script, or ``python -m renorm_repro.cli``)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name == "renorm-repro" or (
        name == "cli.py" and os.path.basename(os.path.dirname(sys.argv[0])) == "renorm_repro"
    )


if _is_command():  # before the imports below (NumPy; later TensorFlow): a signal from now on is honoured
    _interrupts.install()

with _interrupts.exit_now("before anything was written; run the command again"):
    import argparse
    import dataclasses
    import difflib
    import json
    import signal
    import tempfile
    import time
    import typing
    from pathlib import Path

    from renorm_repro.config import (
        EXPERIMENTS,
        LOG_INTERVAL_S,
        PRESETS_BY_EXPERIMENT,
        ConfigError,
        dumps,
        field_metadata,
        get_config,
        optional_inner,
        parse_override_tokens,
        preset_names,
    )

__all__ = ["main", "run_experiment"]

_DEFAULT_EXPERIMENT = "microbatch"


def _type_name(typ) -> str:
    """``INT``, ``FLOAT,...``, ``STR|none``: how a field's value is written on the command line."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if optional_inner(typ) is not None:
        return _type_name(optional_inner(typ)) + "|none"
    if origin is tuple:
        return _type_name(args[0]) + ",..."
    return {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}.get(typ, getattr(typ, "__name__", str(typ)))


def _value_text(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v)) if v else "''"
    return str(v) if v != "" else "''"


def _allowed(name: str, cls):
    """The allowed values of a field with a fixed set of them (its ``choices``; the experiment's arms), else None."""
    if name == "arms":
        return tuple(cls().arm_specs_template())
    return field_metadata(cls, name).get("choices")


def _fields_epilog(experiment: str, preset=None) -> str:
    """Every config field of ``experiment``: its option, type, value (under ``preset`` when given), help, and
    the allowed values where there is a fixed set."""
    cls = EXPERIMENTS[experiment]
    hints = typing.get_type_hints(cls)
    shown = cls()
    if preset in PRESETS_BY_EXPERIMENT[experiment]:
        try:
            shown = get_config(preset, experiment)
        except ConfigError:  # pragma: no cover - every preset is valid
            preset = None
    else:
        preset = None
    others = ", ".join(e for e in sorted(EXPERIMENTS) if e != experiment)
    value_head = f"--preset {preset}" if preset else "base value"
    lines = [
        f"config overrides of --experiment {experiment} (--key VALUE or --key=VALUE; other experiments: "
        f"--experiment {{{others}}} --help):",
        f"  {'option':<26} {'type':<10} {value_head:<16} help",
    ]
    for f in dataclasses.fields(cls):
        if f.name == "experiment":
            continue
        value = _value_text(getattr(shown, f.name))
        text = field_metadata(cls, f.name).get("help", "")
        allowed = _allowed(f.name, cls)
        if allowed:
            text += " {" + ", ".join(allowed) + "}"
        lines.append(f"  --{f.name.replace('_', '-'):<24} {_type_name(hints[f.name]):<10} {value:<16} {text}")
    if preset:
        lines.append(
            f"Values are --preset {preset}'s. `renorm-repro show --preset {preset}` prints them with the "
            f"derived values and the cost."
        )
    else:
        lines.append(
            "Values are the experiment's base (the paper-scale CIFAR-100 setup that presets start from); "
            "add --preset P to --help to see P's values, or `renorm-repro show --preset P`. Presets: "
            + ", ".join(sorted(PRESETS_BY_EXPERIMENT[experiment]))
            + "."
        )
    return "\n".join(lines)


def _prescan(argv):
    """``--experiment`` and ``--preset`` of ``argv``, if given, for the help text (parsing is argparse's job)."""
    found = {}
    for i, tok in enumerate(argv):
        for key in ("--experiment", "--preset"):
            if tok == key and i + 1 < len(argv):
                found[key] = argv[i + 1]
            elif tok.startswith(key + "="):
                found[key] = tok.split("=", 1)[1]
    experiment = found.get("--experiment")
    return (experiment if experiment in EXPERIMENTS else _DEFAULT_EXPERIMENT), found.get("--preset")


def _parser(experiment: str = _DEFAULT_EXPERIMENT, preset=None):
    """The argument parser and its subcommands' parsers (``{name: parser}``)."""
    raw = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument(
        "--tf-logs",
        action="store_true",
        help="show TensorFlow's log lines (hidden by default unless TF_CPP_MIN_LOG_LEVEL is set)",
    )
    doc = __doc__.replace("``", "").replace("::", ":")
    p = argparse.ArgumentParser(
        prog="renorm-repro",
        description=doc.split("\n\n")[0],
        formatter_class=raw,
        epilog=doc.split("\n\n", 1)[1],
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="command", required=True)
    fields = _fields_epilog(experiment, preset)
    parsers = {"run": _run_parser(sub, common, fields)}
    parsers.update(_report_parsers(sub, common, fields))
    parsers.update(_study_parsers(sub, common))
    return p, parsers


def _subcommand(sub, common, name, help_text, epilog=None):
    """A subcommand's parser: the common options, no abbreviations; an ``epilog`` (the config fields) is shown
    as written."""
    layout = {} if epilog is None else {"formatter_class": argparse.RawDescriptionHelpFormatter, "epilog": epilog}
    return sub.add_parser(name, help=help_text, parents=[common], allow_abbrev=False, **layout)


def _run_parser(sub, common, fields):
    """``renorm-repro run``: its own options (the config fields are read from the rest by ``_command_config``)."""
    run = _subcommand(sub, common, "run", "train every arm x seed, then aggregate and plot", epilog=fields)
    run.add_argument(
        "--preset",
        default=None,
        choices=preset_names(),
        help="the preset (required, except with --resume: then the folder's config.json is used)",
    )
    run.add_argument(
        "--experiment",
        default=None,
        choices=sorted(EXPERIMENTS),
        help=f"the experiment (default: {_DEFAULT_EXPERIMENT}, or with --resume the folder's)",
    )
    run.add_argument("--out", required=True, help="output folder (new, or the same one with --resume)")
    run.add_argument(
        "--resume", action="store_true", help="continue the experiment in --out (which must exist) from its checkpoints"
    )
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop each run after this many steps, without a final checkpoint (simulates a kill)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    run.add_argument(
        "--log-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"at most one evaluation line every SECONDS a run, besides its last (default {LOG_INTERVAL_S:g}; "
        "0: every evaluation; metrics.csv holds them all)",
    )
    run.add_argument(
        "--jobs",
        default="auto",
        metavar="N",
        help="train N runs at a time, each in its own process (their numbers are the same as one at a time); "
        "default auto: one a CPU when the config pins each run's TensorFlow threads (threads > 0, as the digits "
        "presets do) and no GPU is visible, else 1",
    )
    run.add_argument(
        "--no-tensorboard",
        action="store_true",
        help="write no TensorBoard event files (by default each run writes every metrics.csv "
        "column and each normalization layer's clip fractions and limits to <run>/tensorboard/)",
    )
    return run


def _report_parsers(sub, common, fields):
    """``plot``, ``show`` and ``bench``: one experiment folder or preset each."""
    plot = _subcommand(sub, common, "plot", "aggregate the logs in --out and write the figure and tables")
    plot.add_argument("--out", required=True)
    show = _subcommand(sub, common, "show", "print a preset's config and derived values (JSON)", epilog=fields)
    show.add_argument("--preset", required=True, choices=preset_names())
    show.add_argument("--experiment", default=_DEFAULT_EXPERIMENT, choices=sorted(EXPERIMENTS))
    bench = _subcommand(
        sub,
        common,
        "bench",
        "measure training steps/s of a preset's model on random data and estimate the preset's time",
        epilog=fields,
    )
    bench.add_argument("--preset", required=True, choices=preset_names())
    bench.add_argument("--experiment", default=_DEFAULT_EXPERIMENT, choices=sorted(EXPERIMENTS))
    bench.add_argument("--arm", default=None, help="default: the experiment's first Batch Renorm arm")
    bench.add_argument("--bench-steps", type=int, default=5, help="timed steps (after one compiling step)")
    bench.add_argument(
        "--gpu-tflops", type=float, default=100.0, help="effective TFLOP/s assumed for the GPU estimate (default 100)"
    )
    return {"plot": plot, "show": show, "bench": bench}


def _study_parsers(sub, common):
    """``compare``, ``pool`` and ``sweep``: several experiment folders."""
    compare = _subcommand(
        sub,
        common,
        "compare",
        "the same arms in two experiment folders (one factor changed), "
        "paired by seed: a table, and a figure with --figure",
    )
    compare.add_argument("--a", required=True, help="experiment folder of the first setting")
    compare.add_argument("--b", required=True, help="experiment folder of the second setting")
    compare.add_argument("--label-a", default=None, help="name of the first setting (default: its folder name)")
    compare.add_argument("--label-b", default=None, help="name of the second setting (default: its folder name)")
    compare.add_argument("--arms", default=None, help="comma-separated arms (default: every arm of both)")
    compare.add_argument("--figure", default=None, help="write the figure here (.png; an .svg beside it)")
    compare.add_argument("--table", default=None, help="write the Markdown table here")
    pool = _subcommand(
        sub,
        common,
        "pool",
        "one experiment's seeds spread over several folders, pooled: per arm the "
        "mean over every seed, per pair the paired difference (renorm_repro.study)",
    )
    pool.add_argument(
        "folders",
        nargs="+",
        help="experiment folders whose configs differ only in seeds and arms (or in fields only the arms "
        "read, if each arm is the same in every folder)",
    )
    pool.add_argument(
        "--arms-of",
        action="append",
        default=[],
        metavar="FOLDER=ARMS",
        help="take only these comma-separated arms from that folder (repeatable; the others give every arm)",
    )
    pool.add_argument("--table", default=None, help="write the Markdown table here (and the JSON beside it)")
    pool.add_argument(
        "--figure", default=None, help="write the figure of every evaluation here (.png; an .svg beside it)"
    )
    sweep = _subcommand(
        sub,
        common,
        "sweep",
        "folders that each ran one Batch Renorm schedule on the same seeds, "
        "against a batch norm reference; the best chosen on validation",
    )
    sweep.add_argument("folders", nargs="+", help="one experiment folder per configuration")
    sweep.add_argument("--reference", required=True, help="folder of batch norm on the same seeds")
    sweep.add_argument("--select", default="val_last4", help="validation scalar to choose on (default val_last4)")
    sweep.add_argument("--table", default=None, help="write the Markdown table here (and the JSON beside it)")
    sweep.add_argument("--figure", default=None, help="write the figure here (.png; an .svg beside it)")
    return {"compare": compare, "pool": pool, "sweep": sweep}


def _study_command(args) -> int:
    """``pool`` and ``sweep`` (:mod:`renorm_repro.study`): tables (and a figure) from the folders' logs."""
    from renorm_repro import study

    if args.command == "pool":
        arms_of = {}
        for spec in args.arms_of:
            folder, sep, arms = spec.rpartition("=")
            if not sep or not folder or not arms.strip():
                raise ConfigError(f"`--arms-of` takes FOLDER=ARMS (e.g. runs/a=bn,bn_iid), got {spec!r}.")
            arms_of[folder] = [a.strip() for a in arms.split(",") if a.strip()]
        result = study.pool(args.folders, arms_of=arms_of)
        text = study.pool_table(result)
        if args.figure:
            print("figures: " + ", ".join(str(p) for p in study.plot_pool(result, args.figure)))
    else:
        result = study.sweep(args.folders, args.reference, select=args.select)
        text = study.sweep_table(result)
        if args.figure:
            print("figures: " + ", ".join(str(p) for p in study.plot_sweep(result, args.figure)))
    print(text)
    if args.table:
        Path(args.table).write_text(text)
        Path(args.table).with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


def _check_options(rest, parser, experiment: str) -> None:
    """Refuse a ``--key`` that is neither an option of ``parser`` nor a config field (no abbreviations)."""
    fields = {f.name for f in dataclasses.fields(EXPERIMENTS[experiment])} - {"experiment"}
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    for tok in rest:
        if not tok.startswith("--") or tok == "--":
            continue
        key = tok[2:].split("=", 1)[0]
        if key.replace("-", "_") in fields:
            continue
        close = difflib.get_close_matches(
            "--" + key.replace("_", "-"), options + ["--" + f.replace("_", "-") for f in sorted(fields)], n=3
        )
        command = parser.prog.split()[-1]
        hint = (
            f" Did you mean {', '.join(close)}?"
            if close
            else f" `renorm-repro {command} --help` lists the options and config fields."
        )
        raise ConfigError(
            f"Unknown config key --{key}, nor an option of `{command}` (options are not abbreviated).{hint}"
        )


def _quiet_tensorflow(signal_fd: int | None = None) -> None:
    """Import TensorFlow without its start-up log lines (oneDNN, CPU features, CUDA probing).

    Called only when the user set neither ``--tf-logs`` nor ``TF_CPP_MIN_LOG_LEVEL``.
    ``TF_CPP_MIN_LOG_LEVEL=2`` hides TensorFlow's later INFO and WARNING lines,
    but some lines are written while its libraries load, before that setting
    applies: the import, and the device probing that prints ``cuInit``
    failures, run with file descriptor 2 sent to a temporary file, which is
    shown if the import fails. A signal during the import ends the process with the command's line, written
    to the real standard error or to ``signal_fd`` (a worker process writes it nowhere: its parent speaks).
    """
    if "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            with _interrupts.exit_now(
                "before anything was written; run the command again", fd=saved if signal_fd is None else signal_fd
            ):
                import tensorflow as tf

                tf.config.list_physical_devices()
                tf.get_logger().setLevel("ERROR")
        except BaseException as e:
            os.dup2(saved, 2)
            if not isinstance(e, KeyboardInterrupt):  # a signal: one line, not TensorFlow's start-up noise
                captured.seek(0)
                sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def benchmark(cfg, arm, steps, gpu_tflops=100.0, log=print):
    """Steps/s of ``arm`` on random data of the preset's shape; FLOP-based time estimates."""
    import numpy as np

    from renorm_repro.data import Dataset
    from renorm_repro.train import train_run

    if steps < 1:
        raise ConfigError(f"--bench-steps must be >= 1, got {steps}.")
    if arm is None:
        arm = next((a for a in cfg.arms if a.startswith("brn")), cfg.arms[0])
    if arm not in cfg.arms:
        raise ConfigError(f"--arm must be one of {cfg.arms}, got {arm!r}.")
    rng = np.random.default_rng(0)
    shape, classes = cfg.image_shape(), cfg.num_classes()
    # Every class present several times (the non-i.i.d. sampler draws per_label distinct images of a class).
    n = max(cfg.batch_size, classes * max(4, getattr(cfg, "per_label", 1)))
    labels = np.arange(n) % classes
    ds = Dataset(
        "random",
        rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
        labels,
        rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
        labels,
        classes,
    )
    bcfg = dataclasses.replace(
        cfg,
        steps=steps + 1,
        eval_every=steps + 1,
        checkpoint_every=10**9,
        eval_batch_size=min(cfg.eval_batch_size, n),
        eval_train_examples=0,
        eval_batch_stats=False,
        val_examples=0,
        eval_lag_examples=0,
        precise_bn_batches=0,
        # the layers' cost does not depend on the breakpoints; a few timed steps
        # cannot hold a warm-up meant for the whole run
        schedule_base="paper_scaled",
        warmup_steps=None,
        warmup_time_constants=None,
        rmax_steps=None,
        dmax_steps=None,
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = train_run(bcfg, arm, 0, tmp + "/run", ds, progress=False, tensorboard=False, log=lambda m: None)
    rate = res["train_steps_per_s"]
    d = cfg.derived()
    run_s = cfg.steps / rate
    total_s = run_s * len(cfg.arms) * len(cfg.seeds)
    gpu_run_s = d["train_flops_per_run"] / (gpu_tflops * 1e12)
    result = {
        "arm": arm,
        "batch_size": cfg.batch_size,
        "timed_steps": steps,
        "steps_per_s": rate,
        "train_flops_per_step": d["train_flops_per_step"],
        "achieved_gflops": rate * d["train_flops_per_step"] / 1e9,
        "run_hours_here": run_s / 3600,
        "preset_hours_here": total_s / 3600,
        "gpu_tflops_assumed": gpu_tflops,
        "gpu_run_hours": gpu_run_s / 3600,
        "gpu_preset_hours": gpu_run_s * len(cfg.arms) * len(cfg.seeds) / 3600,
    }
    log(json.dumps(result, indent=2))
    return result


def _check_data_dir(cfg) -> None:
    """``data_dir`` must be a folder or a file: a device such as ``/dev/null`` is neither (the loaders would
    report it as missing)."""
    from renorm_repro.data import DATASETS, DataError

    spec = DATASETS.get(cfg.dataset)
    if not cfg.data_dir or spec is None or not spec.uses_data_dir:
        return
    path = Path(cfg.data_dir)
    if path.exists() and not (path.is_dir() or path.is_file()):
        raise DataError(
            f"data_dir={cfg.data_dir!r} is neither a folder nor a file (a device, pipe or socket): give "
            f"the folder (or, for cifar100, the archive) holding {cfg.dataset}."
        )


def _load_dataset(cfg, log):
    """``cfg``'s dataset with its validation split (nothing is written before this succeeds)."""
    from renorm_repro.data import load_dataset

    _check_data_dir(cfg)
    synth = (
        dict(num_train=cfg.synthetic_train, num_test=cfg.synthetic_test, num_classes=cfg.synthetic_classes)
        if cfg.dataset == "synthetic"
        else {}
    )
    dataset = load_dataset(
        cfg.dataset, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, val_examples=cfg.val_examples, **synth
    )
    log(f"dataset {dataset.summary()}")
    return dataset


def _log_mode(out, cfg, mode, resume, log) -> None:
    """One line on how the folder is being (re)started, where that is not what the command line says."""
    if mode == "restart":
        log(f"{out} holds an experiment none of whose runs started training; starting it with this config")
    elif mode == "new" and resume:
        log(f"{out} holds no experiment yet (a run stopped before writing its config); starting it")
    elif mode == "extend":
        log(
            f"extending the experiment in {out} to {cfg.steps} steps (it continues exactly as if it had been "
            f"started with them)"
        )


def _train_all(cfg, out, dataset, *, resume, stop_after, progress, tensorboard, log, log_interval, jobs=1) -> bool:
    """Every (seed, arm) run, seeds outermost, ``jobs`` at a time; ``True`` if any run stopped early
    (``--stop-after``)."""
    from renorm_repro.parallel import run_list

    t0 = time.perf_counter()
    runs = run_list(cfg)
    options = dict(
        resume=resume,
        stop_after=stop_after,
        progress=progress,
        tensorboard=tensorboard,
        log=log,
        log_interval=log_interval,
    )
    if jobs > 1:
        from renorm_repro.parallel import train_parallel

        quiet = "tensorflow" not in sys.modules and os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "2"
        stopped = train_parallel(cfg, out, dataset, runs, jobs, quiet_tf=quiet, **options)
        how = f" ({min(jobs, len(runs))} processes)"
    else:
        from renorm_repro.runs import run_dir
        from renorm_repro.train import RunCache, train_run

        stopped, how = False, ""
        cache = RunCache()  # each arm traced once, not once a seed
        for seed, arm in runs:
            res = train_run(cfg, arm, seed, run_dir(out, arm, seed), dataset, cache=cache, **options)
            stopped |= bool(res.get("stopped"))
    log(f"trained {len(cfg.arms)} arms x {len(cfg.seeds)} seeds in {time.perf_counter() - t0:.1f} s{how}")
    return stopped


def run_experiment(
    cfg, out, *, resume=False, stop_after=None, progress=True, tensorboard=True, log=print, log_interval=None, jobs=1
):
    """Train every (arm, seed) of ``cfg`` into ``out``, then write the report. Returns the report.

    ``jobs`` > 1 trains that many runs at a time, each in its own process (:mod:`renorm_repro.parallel`);
    the runs' numbers are the same.

    ``log_interval`` (seconds; None: :data:`renorm_repro.config.LOG_INTERVAL_S`) throttles each run's
    evaluation lines (:func:`renorm_repro.train.train_run`).

    Holds ``out``'s :class:`renorm_repro.runs.ExperimentLock` throughout. The
    data is loaded before anything is written, so a run whose data fails to
    load leaves ``out`` as it was; a folder none of whose runs started training
    is started again (:func:`renorm_repro.runs.check_experiment_dir`).
    """
    from renorm_repro.report import NothingToAggregate, write_report
    from renorm_repro.runs import ExperimentLock, check_experiment_dir, write_experiment_record

    out = Path(out)
    mode = check_experiment_dir(out, cfg, resume=resume)  # before touching anything
    if mode == "resume" and _finished(out, cfg, log):
        return {"summary": "", "figures": [], "complete": True}
    lock = None
    try:
        if out.is_dir():
            lock = ExperimentLock(out).acquire()
            mode = check_experiment_dir(out, cfg, resume=resume)  # again, now that no other run writes here
        dataset = _load_dataset(cfg, log)
        if lock is None:
            out.mkdir(parents=True, exist_ok=True)
            lock = ExperimentLock(out).acquire()
            mode = check_experiment_dir(out, cfg, resume=resume)
        _log_mode(out, cfg, mode, resume, log)
        write_experiment_record(out, cfg, mode)
        stopped = _train_all(
            cfg,
            out,
            dataset,
            resume=mode != "new",
            stop_after=stop_after,
            progress=progress,
            tensorboard=tensorboard,
            log=log,
            log_interval=LOG_INTERVAL_S if log_interval is None else log_interval,
            jobs=jobs,
        )
        try:
            with _interrupts.deferred():  # the report's files are written whole; a signal is honoured after them
                report = write_report(out)
        except NothingToAggregate:
            if not stopped:
                raise
            report = None
    finally:
        if lock is not None:
            lock.release()
    _interrupts.check()
    if report is None:
        log(
            f"stopped early (--stop-after {stop_after}) before the first evaluation: nothing logged yet, so no "
            f"report; the runs continue with --resume"
        )
        return {"summary": "", "figures": [], "stopped": True}
    log(report["summary"])
    log("figures: " + ", ".join(str(p) for p in report["figures"]))
    log(report["aggregate"]["finding"])  # the last line: what the run measured
    if stopped:
        log("stopped early (--stop-after); continue with --resume")
    return report


_TF_ENVIRONMENT_ERRORS = (
    "ResourceExhaustedError",
    "PermissionDeniedError",
    "DataLossError",
    "NotFoundError",
    "UnavailableError",
)


def _environment_error(e: BaseException):
    """One line for an error of the machine rather than of the code (a file, the disk, memory), else None."""
    if isinstance(e, OSError):
        text = e.strerror or str(e) or type(e).__name__
        if e.filename is not None:
            text += f": {e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return text
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(e, tf.errors.OpError) and type(e).__name__ in _TF_ENVIRONMENT_ERRORS:
        first = (str(e.message).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first}"
    return None


def _fail(message: str, code: int) -> int:
    print("renorm-repro: " + " ".join(str(message).split("\n")), file=sys.stderr)
    return code


def _command_config(args, rest, subparsers):
    """The config of ``run``, ``show`` or ``bench``: the preset and overrides, or with ``run --resume`` and no
    ``--preset`` the folder's own ``config.json`` and the overrides (``--steps`` may extend it). No TensorFlow."""
    stored = None
    if args.command == "run" and args.resume and (Path(args.out) / "config.json").is_file():
        from renorm_repro.runs import RunDirError, read_experiment_config

        try:
            stored = read_experiment_config(args.out)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise RunDirError(
                f"{Path(args.out) / 'config.json'} is not a readable experiment config ({e!r}); "
                f"restore it, or start a new --out."
            ) from None
    experiment = args.experiment
    if args.preset is None:
        if stored is None:
            raise ConfigError(
                "`run` needs --preset (only `run --resume` of a folder holding config.json reads "
                "the config from there); `renorm-repro run --help` lists the presets."
            )
        if experiment not in (None, stored.experiment):
            raise ConfigError(
                f"--experiment {experiment}, but {Path(args.out) / 'config.json'} holds a "
                f"{stored.experiment} experiment."
            )
        experiment = stored.experiment
    experiment = experiment or _DEFAULT_EXPERIMENT
    _check_options(rest, subparsers[args.command], experiment)
    overrides = parse_override_tokens(rest)
    if args.preset is None:
        from renorm_repro.config import apply_overrides

        return apply_overrides(stored, overrides)
    return get_config(args.preset, experiment, overrides)


#: Effective training rates behind ``show``'s time estimates. CPU: the shared 2-core CPU of the committed results
#: (``renorm-repro bench``: about 2e11 FLOP/s on the CIFAR-100 presets' convnets, and at most ~250 steps/s
#: however small the model, results/commands.txt). GPU: 25-50 TFLOP/s effective, a range for one H100 on a
#: small convnet (not measured here). ``renorm-repro bench`` measures this machine's rate.
CPU_FLOPS, CPU_STEP_OVERHEAD_S, GPU_FLOPS_RANGE = 2e11, 1 / 250, (5e13, 2.5e13)


def cost(cfg) -> dict:
    """What running ``cfg`` takes: steps, FLOPs, CPU and GPU time estimates, and whether data is downloaded."""
    from renorm_repro.data import (
        CIFAR100_ARCHIVE,
        CIFAR100_FOLDER,
        DATASETS,
        debian_fashion_mnist_dir,
        default_cache_dir,
    )

    d = cfg.derived()
    runs = len(cfg.arms) * len(cfg.seeds)
    flops = d["train_flops_per_run"] * runs
    cpu_s = runs * cfg.steps * (d["train_flops_per_step"] / CPU_FLOPS + CPU_STEP_OVERHEAD_S)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if cfg.dataset == "cifar100":
        have = bool(cfg.data_dir) or (cache / CIFAR100_FOLDER).exists() or (cache / CIFAR100_ARCHIVE).exists()
        download = (
            "no (--data-dir or the cache holds it)"
            if have
            else f"yes: the CIFAR-100 archive (161 MB, MD5-checked) into {cache}, unless --data-dir PATH is given"
        )
    elif cfg.dataset == "fashion_mnist":
        have = bool(cfg.data_dir) or debian_fashion_mnist_dir() is not None or (cache / "fashion-mnist").is_dir()
        download = (
            "no (installed, --data-dir or cached)"
            if have
            else f"yes: the four Fashion-MNIST files (30 MB) into {cache}, unless installed (apt-get install "
            "dataset-fashion-mnist) or --data-dir PATH is given"
        )
    else:
        download = "no (" + DATASETS[cfg.dataset].description + ")"
    return {
        "runs": runs,
        "steps_per_run": cfg.steps,
        "train_flops_per_step": d["train_flops_per_step"],
        "train_flops_total": flops,
        "cpu_hours_estimate": round(cpu_s / 3600, 3),
        "gpu_hours_estimate": [round(flops / f / 3600, 3) for f in GPU_FLOPS_RANGE],
        "estimate_method": (
            f"training only, evaluation excluded: CPU at {CPU_FLOPS:.0e} FLOP/s plus "
            f"{CPU_STEP_OVERHEAD_S * 1e3:.0f} ms per step (the shared 2-core CPU of the committed "
            f"results); GPU at {GPU_FLOPS_RANGE[0]:.1e}-{GPU_FLOPS_RANGE[1]:.1e} FLOP/s effective "
            f"(not measured); `renorm-repro bench` measures this machine"
        ),
        "download": download,
    }


def show_text(cfg) -> str:
    """``show``'s output: the config, its derived values and :func:`cost`, as JSON."""
    record = json.loads(dumps(cfg))
    record["cost"] = cost(cfg)
    return json.dumps(record, indent=2, sort_keys=True)


def _check_bench(cfg, args) -> None:
    if args.bench_steps < 1:
        raise ConfigError(f"--bench-steps must be >= 1, got {args.bench_steps}.")
    if args.arm is not None and args.arm not in cfg.arms:
        raise ConfigError(f"--arm must be one of {cfg.arms}, got {args.arm!r}.")
    if not args.gpu_tflops > 0:
        raise ConfigError(f"--gpu-tflops must be > 0, got {args.gpu_tflops}.")


def _complete_line(out, cfg) -> str:
    from renorm_repro.runs import report_without_runs

    if report_without_runs(out):
        return (
            f"{out}: a finished experiment whose runs are not here (only its report and config are "
            f"committed): nothing to resume, no file changed. To reproduce it, run the same command with a new "
            f"--out and compare its summary.md with {Path(out) / 'summary.md'}."
        )
    return (
        f"{out}: complete ({len(cfg.arms)} arms x {len(cfg.seeds)} seeds at {cfg.steps} steps, report written): "
        f"nothing to do, no file changed (`renorm-repro plot --out {out}` rewrites the report)."
    )


def _finished(out, cfg, log) -> bool:
    """``--resume`` of a folder whose runs are all complete: say so and change nothing when its report is valid
    (:func:`renorm_repro.runs.report_problem`), else rewrite the report from the logs, never touching a run, and
    say why in one line. True when there was nothing else to do; False when some run is not complete."""
    from renorm_repro.runs import ExperimentLock, report_problem, report_without_runs, runs_complete

    if report_without_runs(out):
        log(_complete_line(out, cfg))
        return True
    if not runs_complete(out, cfg):
        return False
    why = report_problem(out, cfg)
    if why is None:
        log(_complete_line(out, cfg))  # nothing is written, not even the lock file
        return True
    from renorm_repro.report import write_report

    with ExperimentLock(out):
        why = report_problem(out, cfg)  # again, now that no other process writes here
        if why is not None:
            with _interrupts.deferred():  # the report's files are written whole; a signal is honoured after them
                write_report(out)
    _interrupts.check()
    if why is None:
        log(_complete_line(out, cfg))
    else:
        log(
            f"{out}: every run is complete but the report was not ({why}): rewrote summary.md, summary.json and "
            f"the figures from the logs; no run changed."
        )
    return True


def _signal_word(signum) -> str:
    return "interrupted" if signum in (None, signal.SIGINT) else f"terminated ({_interrupts.signal_name(signum)})"


def main(argv=None):
    """The ``renorm-repro`` command; ``argv`` given: called from Python, returns the exit code.

    Without ``argv`` this process is the command: SIGINT and SIGTERM are
    recorded from the start (:mod:`renorm_repro.interrupts`), a signal that
    no step reported still ends the command with its line and code (never a
    silent exit 0), and the process leaves with ``os._exit`` once its output
    is flushed (a TensorFlow import cut short by a signal can crash the
    interpreter's teardown).
    """
    if argv is not None:
        return _main(list(argv))
    _interrupts.install()
    try:
        _interrupts.check()  # one received while this module imported
        code = _main(sys.argv[1:])
    except SystemExit as e:  # argparse: --help, usage errors (already printed)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt as e:  # a signal outside _main's handlers (while parsing the command line)
        code = _fail(
            f"{_signal_word(getattr(e, 'signum', None))} before anything was written; run the command again",
            _interrupts.exit_code(getattr(e, "signum", None)),
        )
    except BaseException:  # noqa: BLE001 - print it as Python would, then leave the same way
        if _interrupts.pending() is None:
            import traceback

            traceback.print_exc()
            code = 1
        else:  # whatever a signal turned into (an exception raised from inside a library)
            code = _fail(
                f"{_signal_word(_interrupts.pending())}; continue with --resume if the run had started",
                _interrupts.exit_code(_interrupts.pending()),
            )
    if _interrupts.pending() is not None and code == 0:
        code = _fail(
            f"{_signal_word(_interrupts.pending())} after the command had finished its work (nothing is "
            f"lost; --resume reports a complete run)",
            _interrupts.exit_code(_interrupts.pending()),
        )
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 1)


def _main(argv):
    parser, subparsers = _parser(*_prescan(argv))
    args, rest = parser.parse_known_args(argv)
    resumable = args.command == "run" and (Path(args.out) / "config.json").is_file()
    try:
        if args.command == "compare":
            return _compare_command(args, rest)
        if args.command in ("pool", "sweep"):
            if rest:
                raise ConfigError(f"`{args.command}` takes no config overrides, got {rest}.")
            return _study_command(args)
        if args.command == "plot":
            if rest:
                raise ConfigError(f"`plot` takes only --out, got {rest}.")
            from renorm_repro.report import write_report

            report = write_report(args.out)
            print(report["summary"])
            print("figures: " + ", ".join(str(p) for p in report["figures"]))
            return 0
        return _config_command(args, rest, subparsers)
    except KeyboardInterrupt as e:
        resumable = resumable or (args.command == "run" and (Path(args.out) / "config.json").is_file())
        return _interrupted(e, resumable)
    except ConfigError as e:
        return _fail(f"error: {e}", 2)
    except Exception as e:  # noqa: BLE001 - user-facing errors from data, run folders, files and the disk
        from renorm_repro.data import DataError
        from renorm_repro.parallel import WorkerDied
        from renorm_repro.runs import RunDirError

        if isinstance(e, (DataError, RunDirError)):
            return _fail(f"error: {e}", 1)
        if isinstance(e, WorkerDied):  # a worker was killed (out of memory, kill -9): its run resumes
            return _fail(f"error: {e}; continue with --resume", 1)
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] not in ("renorm", "renorm_repro"):
            # A dependency of the reproduction (TensorFlow, Keras, Matplotlib, ...): the wheel installs this command
            # without them; one line saying what to install, not a traceback.
            return _fail(f"error: {e}; renorm-repro needs the [repro] extra: pip install 'renorm[repro]'", 2)
        text = _environment_error(e)
        if text is None:
            raise
        resumable = resumable or (args.command == "run" and (Path(args.out) / "config.json").is_file())
        return _fail(f"error: {text}" + ("; once fixed, continue with --resume" if resumable else ""), 1)


def _compare_command(args, rest) -> int:
    """``renorm-repro compare``: the table (and ``--table``, ``--figure``) of two experiment folders."""
    if rest:
        raise ConfigError(f"`compare` takes no config overrides, got {rest}.")
    from renorm_repro.report import compare, compare_table, plot_settings

    arms = [a for a in args.arms.split(",") if a] if args.arms else None
    if args.arms is not None and not arms:
        raise ConfigError(f"--arms must name at least one arm, got {args.arms!r}.")
    result = compare(args.a, args.b, arms=arms)
    text = compare_table(result)
    print(text)
    if args.table:
        Path(args.table).write_text(text)
    if args.figure:
        labels = (args.label_a or Path(args.a).name, args.label_b or Path(args.b).name)
        paths = plot_settings(
            {labels[0]: args.a, labels[1]: args.b}, args.figure, arms=arms or sorted({r["arm"] for r in result["rows"]})
        )
        print("figures: " + ", ".join(str(p) for p in paths))
    return 0


def _config_command(args, rest, subparsers) -> int:
    """``show``, ``bench`` and ``run``: the commands of a config (a preset, an experiment, overrides)."""
    # Everything about the command line, the config and --out is checked here, before TensorFlow is imported.
    cfg = _command_config(args, rest, subparsers)
    if args.command == "show":
        print(show_text(cfg))
        return 0
    if args.command == "bench":
        _check_bench(cfg, args)
    else:
        from renorm_repro.runs import check_experiment_dir

        if args.stop_after is not None and args.stop_after < 1:
            raise ConfigError(f"--stop-after must be >= 1, got {args.stop_after}.")
        if args.log_interval is not None and not args.log_interval >= 0:
            raise ConfigError(f"--log-interval must be >= 0 seconds, got {args.log_interval}.")
        mode = check_experiment_dir(args.out, cfg, resume=args.resume)
        if mode == "resume" and _finished(args.out, cfg, print):
            return 0
        _check_data_dir(cfg)
        jobs = _jobs(args.jobs, cfg)
    if cfg.threads:  # read by TensorFlow when it creates its context (and by OpenMP when it loads): before the import
        from renorm_repro.runs import THREAD_VARIABLES

        os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(cfg.threads)))
    in_workers = args.command == "run" and jobs > 1  # only the worker processes import TensorFlow
    if not args.tf_logs and "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        if in_workers:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # the workers see it and import quietly
        else:
            _quiet_tensorflow()
    if not in_workers:
        with _interrupts.exit_now("before anything was written; run the command again"):
            import keras  # noqa: F401 - imported here, where a signal ends the process at once
            import tensorflow  # noqa: F401

            import renorm.tf  # noqa: F401
            import renorm_repro.train  # noqa: F401
    _interrupts.check()  # a signal whose exception an import swallowed
    if args.command == "bench":
        benchmark(cfg, args.arm, args.bench_steps, args.gpu_tflops)
        return 0
    run_experiment(
        cfg,
        args.out,
        resume=args.resume,
        stop_after=args.stop_after,
        progress=not args.no_progress and sys.stderr.isatty(),
        tensorboard=not args.no_tensorboard,
        log_interval=args.log_interval,
        jobs=jobs,
    )
    _interrupts.check()
    return 0


def _jobs(value: str, cfg) -> int:
    """``--jobs``: a positive number, or ``auto`` (:func:`renorm_repro.parallel.auto_jobs`)."""
    from renorm_repro.parallel import SUPPORTED, auto_jobs

    runs = len(cfg.arms) * len(cfg.seeds)
    if value == "auto":
        return auto_jobs(cfg, runs)
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ConfigError(f"--jobs must be a positive number of processes or auto, got {value!r}.")
    if jobs > 1 and not SUPPORTED:
        raise ConfigError(f"--jobs {jobs} needs POSIX signals, which this platform ({os.name}) lacks: use --jobs 1.")
    if jobs > 1 and cfg.strategy != "default":
        raise ConfigError(
            f"--jobs {jobs} trains runs in separate processes, which a tf.distribute strategy's devices cannot "
            f"be shared between; got strategy={cfg.strategy}: use --jobs 1."
        )
    return min(jobs, runs)


def _interrupted(e: KeyboardInterrupt, resumable: bool) -> int:
    """The line and exit code of a signal (SIGINT, SIGTERM) that stopped a command."""
    from renorm_repro.runs import Interrupted

    signum = getattr(e, "signum", None) or _interrupts.pending()
    word, code = _signal_word(signum), _interrupts.exit_code(signum)
    if isinstance(e, Interrupted) and e.step is None:  # the runs of several processes, each named in e.run
        return _fail(f"{word}: {e.run}; continue with --resume", code)
    if isinstance(e, Interrupted):
        ckpt = f"last checkpoint at step {e.checkpoint_step}" if e.checkpoint_step is not None else "no checkpoint yet"
        return _fail(f"{word} at step {e.step} ({e.run}, {ckpt}); continue with --resume", code)
    return _fail(
        f"{word}; continue with --resume"
        if resumable
        else f"{word} before anything was written; run the command again",
        code,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
