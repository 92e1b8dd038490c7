"""Study suite, TensorFlow: where a Fashion-MNIST run of the study spends its time, and its throughput.

    python -m benchmarks.study_tf [--quick] [--rounds 7] [--out FILE]

For the study's two main experiments (``iid``: whole minibatches of 32; ``mbk4``: 128 examples in
micro-batches of 4; the ``fashion`` presets: 28x28x1 inputs, the convnet at width 16, 10 classes, Adam), in one
process and interleaved (A B C A B C ...), it times:

- one training step (``renorm_repro.train``'s model, forward, backward, Adam update, one ``tf.function``)
  with no normalization (``none``, the floor), batch norm (``bn``: the package's layer with ``rmax=1, dmax=0``,
  as the study's batch-norm arms) and Batch Renorm (``brn``), each timed over a block of steps;
- one evaluation as a run makes it every ``eval_every`` steps: inference on the validation and test splits in
  batches of ``eval_batch_size`` (5000 + 10000 examples) and the moving-statistics lag diagnostic
  (``eval_lag_examples`` = 2000 training examples through the layers' inputs, statistics in float64).

From these it gives each candidate's ratio to the step with no normalization, its effective GFLOP/s
(``derived.train_flops_per_step`` of the config over the step's time) and the split of a whole run's time
between training steps, evaluations and the lag diagnostic (steps x step time + evaluations x their time).
Thread pools are TensorFlow's defaults unless ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS`` are set
(the study's queues run with 1 each, two at a time); the JSON records them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.common import machine_info, markdown_table, measure, parse_args, summarize, write_results  # noqa: E402
from renorm_repro.config import get_config  # noqa: E402
from renorm_repro.train import build_model, make_norm_layer  # noqa: E402

#: The study's experiments: (preset experiment, overrides, its batch-norm arm, its Batch Renorm arm).
EXPERIMENTS = {
    "iid": ("iid", {}, "bn", "brn"),
    "mbk4": ("microbatch", {"microbatch_size": "4"}, "bn_micro", "brn_micro"),
}


def _model(cfg, arm, seed=0):
    keras.utils.set_random_seed(seed)
    if arm is None:
        return build_model((28, 28, 1), 10, cfg.width, lambda name: keras.layers.Identity(name=name))
    return build_model((28, 28, 1), 10, cfg.width, lambda name: make_norm_layer(cfg, arm, name))


def _train_block(cfg, arm, block):
    """A callable running ``block`` training steps of ``arm`` (None: no normalization) on fixed random data."""
    model = _model(cfg, arm)
    opt = keras.optimizers.Adam(cfg.learning_rate)
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((cfg.batch_size, 28, 28, 1), np.float32))
    y = tf.constant(rng.integers(0, 10, cfg.batch_size))

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    def run():
        for _ in range(block):
            out = step(x, y)
        return out.numpy()

    return run


def _evaluation(cfg, arm, examples, lag_examples):
    """Callables of one evaluation's two parts: inference over ``examples``, and the lag diagnostic."""
    model = _model(cfg, arm)
    norms = [layer for layer in model.layers if layer.name.startswith("norm")]
    lag_model = keras.Model(model.inputs, [layer.input for layer in norms])
    rng = np.random.default_rng(1)
    x_eval = rng.standard_normal((examples, 28, 28, 1)).astype(np.float32)
    y_eval = rng.integers(0, 10, examples)
    x_lag = rng.standard_normal((lag_examples, 28, 28, 1)).astype(np.float32)

    @tf.function
    def eval_batch(x, y):
        logits = model(x, training=False)
        per_ex = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return tf.reduce_sum(per_ex), tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float32))

    def inference():
        total = 0.0
        for i in range(0, examples, cfg.eval_batch_size):
            loss, correct = eval_batch(x_eval[i : i + cfg.eval_batch_size], y_eval[i : i + cfg.eval_batch_size])
            total += float(loss) + float(correct)
        return total

    def lag():
        # As renorm_repro.train's lag_stats: the layers' inputs in batches of 500, sums in float64.
        s = 0.0
        for i in range(0, lag_examples, 500):
            for f in lag_model(x_lag[i : i + 500], training=False):
                f = np.asarray(f, dtype=np.float64).reshape(-1, f.shape[-1])
                s += float(f.sum() + (f * f).sum())
        return s

    return inference, lag


def run(args):
    rows, raw, split_rows = [], {}, []
    for name, (experiment, overrides, bn_arm, brn_arm) in EXPERIMENTS.items():
        cfg = get_config("fashion", experiment, overrides)
        block = 2 if args.quick else 20
        examples = 2000 if args.quick else cfg.val_examples + 10000  # validation + Fashion-MNIST's test split
        lag_examples = 500 if args.quick else cfg.eval_lag_examples
        cands = {
            "none": _train_block(cfg, None, block),
            "bn": _train_block(cfg, bn_arm, block),
            "brn": _train_block(cfg, brn_arm, block),
        }
        inference, lag = _evaluation(cfg, brn_arm, examples, lag_examples)
        cands["evaluation (inference)"] = inference
        cands["evaluation (lag diagnostic)"] = lag
        times = measure(cands, rounds=args.rounds, warmup=args.warmup)
        summary = summarize(times, floor="none")
        flops = cfg.derived()["train_flops_per_step"]
        raw[name] = {"times_s": times, "summary": summary}
        step_s = {}
        for cand in ("none", "bn", "brn"):
            s = summary[cand]
            step_s[cand] = s["median_ms"] / 1e3 / block
            rows.append(
                {
                    "experiment": name,
                    "candidate": cand,
                    "ms_per_step": 1e3 * step_s[cand],
                    "steps_per_s": 1.0 / step_s[cand],
                    "gflops": flops / step_s[cand] / 1e9,
                    "vs_no_norm": s["vs_floor"],
                    "spread": s["spread"],
                }
            )
        evals = cfg.steps // cfg.eval_every
        scale = (cfg.val_examples + 10000) / examples
        inf_s = summary["evaluation (inference)"]["median_ms"] / 1e3 * scale
        lag_s = summary["evaluation (lag diagnostic)"]["median_ms"] / 1e3 * cfg.eval_lag_examples / lag_examples
        for cand in ("bn", "brn"):
            train_s = cfg.steps * step_s[cand]
            total = train_s + evals * (inf_s + lag_s)
            split_rows.append(
                {
                    "experiment": name,
                    "arm": cand,
                    "steps": cfg.steps,
                    "evaluations": evals,
                    "run_s": total,
                    "training_steps": train_s / total,
                    "evaluations_inference": evals * inf_s / total,
                    "lag_diagnostic": evals * lag_s / total,
                }
            )
        for r in rows[-3:]:
            print(
                f"{name:5s} {r['candidate']:5s} {r['ms_per_step']:7.2f} ms/step  {r['steps_per_s']:6.1f} steps/s  "
                f"{r['gflops']:6.1f} GFLOP/s  x{r['vs_no_norm']:.3f} of no norm",
                flush=True,
            )
    table = markdown_table(
        rows, ["experiment", "candidate", "ms_per_step", "steps_per_s", "gflops", "vs_no_norm", "spread"]
    )
    split = markdown_table(
        split_rows,
        [
            "experiment",
            "arm",
            "steps",
            "evaluations",
            "run_s",
            "training_steps",
            "evaluations_inference",
            "lag_diagnostic",
        ],
    )
    print(table + "\n\n" + split)
    threads = {k: os.environ.get(k) for k in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")}
    write_results(
        args.out,
        {
            "suite": "study_tf",
            "machine": machine_info(),
            "tensorflow": tf.__version__,
            "threads": threads,
            "rounds": args.rounds,
            "rows": rows,
            "run_split": split_rows,
            "raw": raw,
            "table": table,
            "split_table": split,
        },
        args,
    )


if __name__ == "__main__":
    run(parse_args(__doc__.splitlines()[0], "benchmarks/results/study_tf.json"))
