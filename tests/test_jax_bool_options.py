"""The Flax modules' boolean options are booleans (issue 22: ``use_fast_variance="no"`` was taken as True)."""

import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import renorm.jax.nnx as rnnx  # noqa: E402
from renorm.jax import BatchRenorm  # noqa: E402
from renorm.jax import functional as F  # noqa: E402

OPTIONS = ("use_fast_variance", "explicit_backward", "force_float32_reductions")


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("bad", ["no", "False", 0, 1, None])
def test_a_boolean_option_that_is_not_a_boolean_is_refused_naming_it(name, bad):
    x = jnp.ones((4, 3))
    with pytest.raises(TypeError, match=f"`{name}` must be True or False, got {name}={bad!r}"):
        BatchRenorm(use_running_average=False, **{name: bad}).init(jax.random.key(0), x)
    if name != "force_float32_reductions":  # an option of the linen module only
        with pytest.raises(TypeError, match=f"`{name}` must be True or False"):
            rnnx.BatchRenorm(3, **{name: bad}, rngs=nnx.Rngs(0))(x)


@pytest.mark.parametrize("good", [True, False, np.bool_(True)])
def test_booleans_are_accepted(good):
    F.BatchRenormConfig(use_fast_variance=good, explicit_backward=good, force_float32_reductions=good)
    BatchRenorm(use_running_average=False, use_fast_variance=good).init(jax.random.key(0), jnp.ones((4, 3)))
