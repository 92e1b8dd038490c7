"""Step suite, TensorFlow: one training step of the reproduction's convnet per normalization.

    python -m benchmarks.step_tf [--quick] [--width 32] [--out FILE]

The model is ``renorm_repro.train.build_model`` (the plain 4-layer convnet
of the reproduction) on 32x32x3 inputs, 100 classes, Adam, one
``tf.function`` step (forward, backward, update), batches of 1600 and 256.
Candidates: no normalization, the fused batch-norm op as a layer (the
fastest batch norm TensorFlow has, ``benchmarks/tf_fused.py``; the
baseline), Keras ``BatchNormalization``, Keras with ``renorm=True``, and
``renorm.tf.BatchRenormalization`` on the whole batch and on micro-batches
of 4 and 2. Ratios are to the fastest batch norm, taken within one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.common import parse_args, run_step_suite, step_suite_args  # noqa: E402
from benchmarks.tf_fused import FusedBatchNorm  # noqa: E402
from renorm.tf import BatchRenormalization  # noqa: E402
from renorm_repro.train import build_model  # noqa: E402

NORMS = {
    "none": lambda name: keras.layers.Identity(name=name),
    "fused BN": lambda name: FusedBatchNorm(name=name),
    "keras BN": lambda name: keras.layers.BatchNormalization(name=name),
    "keras BN renorm": lambda name: keras.layers.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 1 / 3.0, "dmax": 5.0}, renorm_momentum=0.99, name=name
    ),
    "renorm": lambda name: BatchRenormalization(name=name),
    "renorm mb=4": lambda name: BatchRenormalization(microbatch_size=4, name=name),
    "renorm mb=2": lambda name: BatchRenormalization(microbatch_size=2, name=name),
}


def _step_fn(norm, batch, width, seed=0):
    keras.utils.set_random_seed(seed)
    model = build_model((32, 32, 3), 100, width, norm)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal((batch, 32, 32, 3), np.float32))
    y = tf.constant(rng.integers(0, 100, batch))

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return lambda: step(x, y)


def run(args):
    run_step_suite(
        args, suite="step_tf", norms=NORMS, step_fn=_step_fn, baseline="fused BN", extra={"tensorflow": tf.__version__}
    )


if __name__ == "__main__":
    run(parse_args(__doc__.splitlines()[0], "benchmarks/results/step_tf.json", extra=step_suite_args))
