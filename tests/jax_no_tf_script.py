"""Run in a subprocess: every import of the JAX port works with TensorFlow and Keras unimportable."""

import importlib.abc
import sys


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, Block())
try:
    import tensorflow  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("the blocker does not work")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import renorm.jax  # noqa: E402
import renorm.jax.functional  # noqa: E402
import renorm.jax.linen  # noqa: E402
import renorm.jax.nnx  # noqa: E402

x = jnp.arange(24.0).reshape(6, 4)
module = renorm.jax.BatchRenorm(use_running_average=False, microbatch_size=3)
v = module.init(jax.random.key(0), x)
y, upd = module.apply(v, x, mutable=["batch_stats"])
assert int(upd["batch_stats"]["step"]) == 1
layer = renorm.jax.nnx.BatchRenorm(4, rngs=nnx.Rngs(0))
layer(x)
assert int(layer.step[...]) == 1
assert not any(m.split(".")[0] in ("tensorflow", "keras") for m in sys.modules)
print("no-tf OK")
