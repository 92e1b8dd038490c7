"""Drop-in check in code nobody here wrote: sb3-contrib's CrossQ with its BatchRenorm swapped for renorm.torch's.

    pip install torch==2.13.0 sb3-contrib gymnasium   # not part of any extra; torch must stay 2.13.0
    python -m benchmarks.crossq_torch [--quick] [--seeds 0,1] [--steps 6000] [--threads 1] [--resume] [--out FILE]

Trains CrossQ (sb3_contrib 2.9.2) on Pendulum-v1 twice per seed, interleaved: once with
its own ``sb3_contrib.common.torch_layers.BatchRenorm1d`` and once with
``renorm.torch.BatchRenorm1d`` in its place, then reports the mean return of 10
deterministic evaluation episodes per run, and the same before training, and the paired difference
(ours minus sb3-contrib's) over the seeds. The output is rewritten after every run (atomically);
``--resume`` keeps its finished runs and runs the others (the same settings, or it stops with one line).

The swap replaces the name ``BatchRenorm1d`` in ``sb3_contrib.crossq.policies``, which
both builds the networks (``partial(BatchRenorm1d, momentum=..., eps=...,
warmup_steps=...)``) and finds the norms to switch between train and eval
(``set_bn_training_mode``); the script checks that the built policy holds only the
intended class. The adapter maps sb3's arguments onto ours: ``momentum`` (both
PyTorch's update rate), ``eps``, its hard-coded ``rmax=3, dmax=5``, and its warm-up
(sb3 uses batch statistics while ``steps <= warmup_steps``, ours while ``t <
warmup_steps``: ``warmup_steps + 1`` here). The two layers still differ where sb3's
departs from the paper: it normalizes and tracks with the *unbiased* batch variance,
keeps a moving variance (ours a moving standard deviation), and puts ``eps`` inside
``sqrt(var / r**2 + eps)``.

Deviations from CrossQ's defaults, to fit a loaded 2-core CPU: networks
``pi=[64, 64], qf=[256, 256]`` (CrossQ's own comment says it works with a [256, 256]
critic; its default is [1024, 1024]), ``renorm_warmup_steps=1000`` (default 100000,
longer than the run: both would be plain batch norm throughout), ``learning_starts=
500``. Everything else is CrossQ's default. A full run (no option changed) writes
``benchmarks/results/crossq_torch.json``; any other run writes the git-ignored
scratch folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.common import machine_info

RESULTS = "benchmarks/results/crossq_torch.json"
SCRATCH = "benchmarks/results/scratch/crossq_torch.json"
LAYERS = ("sb3-contrib", "renorm.torch")


def ours_for_sb3():
    """``renorm.torch.BatchRenorm1d`` with sb3-contrib's constructor signature and constants."""
    from renorm.torch import BatchRenorm1d

    class RenormForCrossQ(BatchRenorm1d):
        def __init__(self, num_features, eps=0.001, momentum=0.01, affine=True, warmup_steps=100_000):
            super().__init__(
                num_features,
                eps=eps,
                momentum=momentum,
                affine=affine,
                rmax=3.0,
                dmax=5.0,
                warmup_steps=warmup_steps + 1,
            )

    return RenormForCrossQ


def train(which: str, seed: int, steps: int, eval_episodes: int) -> dict:
    import gymnasium as gym
    import torch
    from sb3_contrib import CrossQ
    from sb3_contrib.common import torch_layers
    from sb3_contrib.crossq import policies
    from stable_baselines3.common.evaluation import evaluate_policy

    cls = ours_for_sb3() if which == "renorm.torch" else torch_layers.BatchRenorm1d
    other = torch_layers.BatchRenorm1d if which == "renorm.torch" else ours_for_sb3().__mro__[1]
    policies.BatchRenorm1d = cls
    try:
        torch.manual_seed(seed)
        env = gym.make("Pendulum-v1")
        model = CrossQ(
            "MlpPolicy",
            env,
            seed=seed,
            learning_starts=500,
            verbose=0,
            policy_kwargs=dict(net_arch=dict(pi=[64, 64], qf=[256, 256]), renorm_warmup_steps=1000),
        )
        norms = [m for m in model.policy.modules() if isinstance(m, (cls, other))]
        assert norms and all(type(m) is cls for m in norms), f"{which}: the policy holds {set(map(type, norms))}"
        eval_env = gym.make("Pendulum-v1")
        before, _ = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True)
        t0 = time.perf_counter()
        model.learn(total_timesteps=steps)
        seconds = time.perf_counter() - t0
        after, after_std = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True)
        step_counts = sorted({int(getattr(m, "num_batches_tracked", getattr(m, "steps", -1))) for m in norms})
        return {
            "which": which,
            "seed": seed,
            "steps": steps,
            "return_before": float(before),
            "return_after": float(after),
            "return_after_std": float(after_std),
            "train_seconds": seconds,
            "norm_layers": len(norms),
            "norm_step_counters": step_counts,
        }
    finally:
        policies.BatchRenorm1d = torch_layers.BatchRenorm1d


def _load_resume(out: str, settings: dict) -> list:
    """The finished runs of an earlier call with the same settings (``--resume``); [] if ``out`` does not exist."""
    if not os.path.exists(out):
        return []
    try:
        with open(out) as f:
            old = json.load(f)
        old_settings, runs = old["settings"], old["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"crossq_torch: cannot resume from {out}: {type(e).__name__}: {e}") from None
    if old_settings != settings:
        raise SystemExit(f"crossq_torch: {out} was written with {old_settings}, not {settings}; use another --out")
    return runs


def summarize(runs: list) -> dict:
    """Per layer: mean, min, max of the return after training; the paired difference over the seeds both ran."""
    from renorm_repro.stats import paired_difference

    summary = {}
    for which in LAYERS:
        mine = [r for r in runs if r["which"] == which]
        if not mine:
            continue
        rs = [r["return_after"] for r in mine]
        summary[which] = {
            "mean_return": statistics.mean(rs),
            "min": min(rs),
            "max": max(rs),
            "n": len(rs),
            "mean_return_before": statistics.mean(r["return_before"] for r in mine),
            "mean_train_seconds": statistics.mean(r["train_seconds"] for r in mine),
        }
    after = {w: {r["seed"]: r["return_after"] for r in runs if r["which"] == w} for w in LAYERS}
    if set(after[LAYERS[0]]) & set(after[LAYERS[1]]):
        summary["renorm.torch minus sb3-contrib"] = paired_difference(after[LAYERS[0]], after[LAYERS[1]])
    return summary


def _versions() -> dict:
    from importlib.metadata import version

    return {"torch": version("torch"), "sb3_contrib": version("sb3-contrib")}


def _write(out: str, full: bool, settings: dict, runs: list, complete: bool) -> None:
    """The results so far, atomically (a crash loses at most the run in progress)."""
    doc = {
        "suite": "crossq_torch",
        "full": full,
        "complete": complete,
        "settings": settings,
        **_versions(),
        "env": "Pendulum-v1",
        "runs": runs,
        "summary": summarize(runs),
        "machine": machine_info(),  # the processor, cores and load averages when this was written
        "note": "small networks (see the module docstring)",
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 600 steps: a check that it runs (scratch)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=6000, help="environment steps per run (default: %(default)s)")
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: %(default)s; on 2 shared cores 2 threads were 3.7x slower)",
    )
    p.add_argument("--resume", action="store_true", help="keep the finished runs in --out, run the others")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    full = not args.quick and all(
        getattr(args, k) == p.get_default(k) for k in ("seeds", "steps", "eval_episodes", "threads")
    )
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = 600 if args.quick else args.steps
    episodes = 2 if args.quick else args.eval_episodes
    out = args.out or (RESULTS if full else SCRATCH)
    if not full and os.path.abspath(out) == os.path.abspath(RESULTS):
        p.error(f"only a full run writes {RESULTS}")
    settings = {"seeds": seeds, "steps": steps, "eval_episodes": episodes, "threads": args.threads}
    runs = _load_resume(out, settings) if args.resume else []
    if not args.resume and os.path.exists(out) and out == RESULTS:
        p.error(f"{RESULTS} exists: --resume continues it, or remove it to start again")
    import torch

    torch.set_num_threads(args.threads)
    done = {(r["seed"], r["which"]) for r in runs}
    for seed in seeds:
        for which in LAYERS:  # interleaved
            if (seed, which) in done:
                continue
            r = train(which, seed, steps, episodes)
            runs.append(r)
            print(json.dumps(r), flush=True)
            _write(out, full, settings, runs, complete=False)
    _write(out, full, settings, runs, complete=True)
    print(json.dumps(summarize(runs), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
