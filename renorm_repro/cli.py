"""``renorm-repro``: run the paper's experiments and plot them.

Usage::

    renorm-repro run  --preset quick --out runs/quick [--experiment microbatch] [--resume] [--key value ...]
    renorm-repro run  --experiment noniid --preset digits --out runs/noniid   # Figure 3 (section 4.3)
    renorm-repro run  --experiment iid --preset digits --out runs/iid         # Figure 1 (section 4.1)
    renorm-repro plot --out runs/quick
    renorm-repro show --preset seed [--key value ...]     # print the config and derived values
    renorm-repro bench --preset seed --bench-steps 5      # steps/s of one arm on random data, time estimates

``run`` trains every arm x seed of the experiment (each into its own
directory), then aggregates and plots. ``plot`` reads only the logs in
``--out``. Any config field is an override: ``--steps 100``, ``--seeds 0,1``,
``--arms bn_micro,brn_micro``, ``--dataset cifar100 --data-dir PATH``; unknown
keys and wrong types are refused. Experiments: ``microbatch`` (Figure 2, the
default), ``noniid`` (Figure 3), ``iid`` (Figure 1); each has the presets
``paper``, ``quick``, ``digits`` (the committed results) and ``smoke``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from renorm_repro.config import EXPERIMENTS, ConfigError, dumps, get_config, parse_override_tokens, preset_names

__all__ = ["main", "run_experiment"]


def _parser():
    p = argparse.ArgumentParser(prog="renorm-repro", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every arm x seed, then aggregate and plot")
    run.add_argument("--preset", required=True, choices=preset_names())
    run.add_argument("--experiment", default="microbatch", choices=sorted(EXPERIMENTS))
    run.add_argument("--out", required=True, help="output folder (new, or the same one with --resume)")
    run.add_argument("--resume", action="store_true", help="continue the runs in --out from their checkpoints")
    run.add_argument("--stop-after", type=int, default=None,
                     help="stop each run after this many steps, without a final checkpoint (simulates a kill)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    plot = sub.add_parser("plot", help="aggregate the logs in --out and write the figure and tables")
    plot.add_argument("--out", required=True)
    show = sub.add_parser("show", help="print a preset's config and derived values (JSON)")
    show.add_argument("--preset", required=True, choices=preset_names())
    show.add_argument("--experiment", default="microbatch", choices=sorted(EXPERIMENTS))
    bench = sub.add_parser("bench", help="measure training steps/s of a preset's model on random data "
                                         "and estimate the preset's time")
    bench.add_argument("--preset", required=True, choices=preset_names())
    bench.add_argument("--experiment", default="microbatch", choices=sorted(EXPERIMENTS))
    bench.add_argument("--arm", default=None, help="default: the experiment's first Batch Renorm arm")
    bench.add_argument("--bench-steps", type=int, default=5, help="timed steps (after one compiling step)")
    bench.add_argument("--gpu-tflops", type=float, default=100.0,
                       help="effective TFLOP/s assumed for the GPU estimate (default 100)")
    return p


def benchmark(cfg, arm, steps, gpu_tflops=100.0, log=print):
    """Steps/s of ``arm`` on random data of the preset's shape; FLOP-based time estimates."""
    import tempfile

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
    ds = Dataset("random", rng.integers(0, 256, (n,) + shape, dtype=np.uint8), labels,
                 rng.integers(0, 256, (n,) + shape, dtype=np.uint8), labels, classes)
    import dataclasses

    bcfg = dataclasses.replace(cfg, steps=steps + 1, eval_every=steps + 1, checkpoint_every=10 ** 9,
                               eval_batch_size=min(cfg.eval_batch_size, n), eval_train_examples=0,
                               eval_batch_stats=False, val_examples=0, eval_lag_examples=0)
    with tempfile.TemporaryDirectory() as tmp:
        res = train_run(bcfg, arm, 0, tmp + "/run", ds, progress=False, log=lambda m: None)
    rate = res["train_steps_per_s"]
    d = cfg.derived()
    run_s = cfg.steps / rate
    total_s = run_s * len(cfg.arms) * len(cfg.seeds)
    gpu_run_s = d["train_flops_per_run"] / (gpu_tflops * 1e12)
    result = {
        "arm": arm, "batch_size": cfg.batch_size, "timed_steps": steps, "steps_per_s": rate,
        "train_flops_per_step": d["train_flops_per_step"], "achieved_gflops": rate * d["train_flops_per_step"] / 1e9,
        "run_hours_here": run_s / 3600, "preset_hours_here": total_s / 3600,
        "gpu_tflops_assumed": gpu_tflops, "gpu_run_hours": gpu_run_s / 3600,
        "gpu_preset_hours": gpu_run_s * len(cfg.arms) * len(cfg.seeds) / 3600,
    }
    log(json.dumps(result, indent=2))
    return result


def run_experiment(cfg, out, *, resume=False, stop_after=None, progress=True, log=print):
    """Train every (arm, seed) of ``cfg`` into ``out``, then write the report. Returns the report."""
    from renorm_repro.data import load_dataset
    from renorm_repro.report import write_report
    from renorm_repro.runs import prepare_experiment_dir, run_dir
    from renorm_repro.train import train_run

    out = prepare_experiment_dir(out, cfg, resume=resume)
    synth = dict(num_train=cfg.synthetic_train, num_test=cfg.synthetic_test, num_classes=cfg.synthetic_classes) \
        if cfg.dataset == "synthetic" else {}
    dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir,
                           val_examples=cfg.val_examples, **synth)
    log(f"dataset {dataset.summary()}")
    t0 = time.perf_counter()
    stopped = False
    for seed in cfg.seeds:
        for arm in cfg.arms:
            res = train_run(cfg, arm, seed, run_dir(out, arm, seed), dataset, resume=resume,
                            stop_after=stop_after, progress=progress, log=log)
            stopped |= bool(res.get("stopped"))
    log(f"trained {len(cfg.arms)} arms x {len(cfg.seeds)} seeds in {time.perf_counter() - t0:.1f} s")
    report = write_report(out)
    log(report["summary"])
    log("figures: " + ", ".join(str(p) for p in report["figures"]))
    if stopped:
        log("stopped early (--stop-after); continue with --resume")
    return report


def main(argv=None):
    args, rest = _parser().parse_known_args(argv)
    try:
        if args.command == "plot":
            if rest:
                raise ConfigError(f"`plot` takes only --out, got {rest}.")
            from renorm_repro.report import write_report

            report = write_report(args.out)
            print(report["summary"])
            print("figures: " + ", ".join(str(p) for p in report["figures"]))
            return 0
        cfg = get_config(args.preset, args.experiment, parse_override_tokens(rest))
        if args.command == "bench":
            benchmark(cfg, args.arm, args.bench_steps, args.gpu_tflops)
            return 0
        if args.command == "show":
            print(dumps(cfg))
            return 0
        if args.stop_after is not None and args.stop_after < 1:
            raise ConfigError(f"--stop-after must be >= 1, got {args.stop_after}.")
        run_experiment(cfg, args.out, resume=args.resume, stop_after=args.stop_after,
                       progress=not args.no_progress)
        return 0
    except ConfigError as e:
        print(f"renorm-repro: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - user-facing errors from data and run folders
        from renorm_repro.data import DataError
        from renorm_repro.runs import RunDirError

        if isinstance(e, (DataError, RunDirError)):
            print(f"renorm-repro: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
