"""Step suite, JAX: one training step of the reproduction's convnet in Flax, per normalization.

    python -m benchmarks.step_jax [--quick] [--width 32] [--out FILE]

The same plain 4-layer convnet as ``renorm_repro.train.build_model`` (3x3
convolutions of width w, 2w, 4w, 8w without bias, each followed by the
normalization and a ReLU, max-pooling after the second and third, global
average pooling, a dense classifier) written in ``flax.linen``, on 32x32x3
inputs, 100 classes, Adam, one jitted step (forward, backward, update),
batches of 1600 and 256. Candidates: no normalization,
``flax.linen.BatchNorm`` (its default, fast variance, and two-pass) and
``renorm.jax.BatchRenorm`` on the whole batch and on micro-batches of 4 and
2. Ratios are to ``flax.linen.BatchNorm`` with its defaults, within one run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from benchmarks.common import device_results, parse_args, run_step_suite, step_suite_args
from renorm.jax import BatchRenorm


class _Identity(nn.Module):
    use_running_average: bool = False

    @nn.compact
    def __call__(self, x):
        return x


NORMS = {
    "none": _Identity,
    "flax BN": nn.BatchNorm,
    "flax BN two-pass": functools.partial(nn.BatchNorm, use_fast_variance=False),
    "renorm": BatchRenorm,
    "renorm mb=4": functools.partial(BatchRenorm, microbatch_size=4),
    "renorm mb=2": functools.partial(BatchRenorm, microbatch_size=2),
}


class ConvNet(nn.Module):
    width: int
    norm: type
    num_classes: int = 100

    @nn.compact
    def __call__(self, x, train: bool):
        for i, ch in enumerate((self.width, 2 * self.width, 4 * self.width, 8 * self.width)):
            x = nn.Conv(ch, (3, 3), padding="SAME", use_bias=False)(x)
            x = self.norm(use_running_average=not train)(x)
            x = nn.relu(x)
            if i in (1, 2):
                x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def _step_fn(norm, batch, width, seed=0):
    model = ConvNet(width, norm)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, 100, batch))
    variables = model.init(jax.random.PRNGKey(seed), x, train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, stats, opt_state, x, labels):
        def loss_fn(params):
            logits, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

        (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd.get("batch_stats", stats), opt_state, loss

    return lambda: step(params, stats, opt_state, x, labels)


def run(args):
    run_step_suite(
        args,
        suite="step_jax",
        norms=NORMS,
        step_fn=_step_fn,
        baseline="flax BN",
        sync=jax.block_until_ready,
        extra={"devices": [str(d) for d in jax.devices()], "jax": jax.__version__},
    )


if __name__ == "__main__":
    run(
        parse_args(
            __doc__.splitlines()[0],
            device_results("benchmarks/results/step_jax.json", jax.default_backend()),
            extra=step_suite_args,
        )
    )
