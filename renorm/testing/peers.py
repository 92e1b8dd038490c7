"""Adapters for other libraries' Batch Renorm layers, and why each departs from the paper where it does.

None of these libraries is a dependency of renorm. Install the ones to check beside your frameworks without
letting pip replace them (``--no-deps``), into a folder of their own if you like, and make it importable::

    pip install --no-deps --target ~/peers torchrl==0.14.1 sb3-contrib==2.9.2 sbx-rl==0.28.0 tf_keras==2.21.0
    PYTHONPATH=~/peers python -m renorm.testing --peer torchrl --peer sbx

Without their own dependencies (tensordict, gymnasium, stable_baselines3) torchrl, sb3-contrib and sbx do not
import as packages; the adapters then load the one source file that defines the layer from the installed
distribution (:func:`load_source`), which needs only torch or Flax. Keras 3's ``BatchNormalization(renorm=True)``
runs on the current Keras backend (``KERAS_BACKEND``).

Each adapter configures its layer as close to the paper as the layer's API allows (momentum, epsilon, the limits
where they can be set, the case's warm-up where there is one) and writes what it chose into ``settings``; a case
the layer cannot run (micro-batches, a ramp of the limits, a warm-up it lacks, an input rank it does not
normalize) is skipped with the reason. :data:`CAUSES` records, per configuration and version, what the
implementation does differently from the paper and where (file and line of the version tested);
``tests/test_peers.py`` re-derives each rule in NumPy and shows it reproduces the peer's numbers, and
``python -m benchmarks.conformance`` writes the report (``docs/conformance.md``).

>>> sorted(PEERS)
['keras', 'sb3-contrib', 'sbx', 'tf_keras', 'torchrl']
>>> [a.key for a in peer_adapters("keras")]
['keras', 'keras-conforming']
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types

import numpy as np

from renorm.testing._driver import Adapter
from renorm.testing._registry import Case

__all__ = [
    "PEERS",
    "WARMUP_CASES",
    "Cause",
    "CAUSES",
    "causes",
    "load_source",
    "peer_adapters",
    "KerasBNAdapter",
    "TFKerasBNAdapter",
    "TorchRLAdapter",
    "SB3ContribAdapter",
    "SbxAdapter",
]

# name -> (the module that must import, how to install it)
PEERS: dict[str, tuple[str, str]] = {
    "keras": ("keras", "pip install keras (with TensorFlow, JAX or PyTorch; KERAS_BACKEND picks the backend)"),
    "tf_keras": ("tf_keras", "pip install --no-deps tf_keras==X.Y, X.Y your TensorFlow's version"),
    "torchrl": ("torchrl", "pip install --no-deps --target DIR torchrl, then PYTHONPATH=DIR"),
    "sb3-contrib": ("sb3_contrib", "pip install --no-deps --target DIR sb3-contrib, then PYTHONPATH=DIR"),
    "sbx": ("sbx", "pip install --no-deps --target DIR sbx-rl, then PYTHONPATH=DIR"),
}

# The peers' warm-up case: PEER_CASES's tight limits after 2 steps of batch norm, 8 steps, so that a warm-up factor
# that keeps growing (torchrl's) is seen at 1, 2 and 3 times the limits.
WARMUP_CASES: list[Case] = [Case("peer_warmup", (16, 8), rmax=1.5, dmax=0.5, warmup_steps=2, steps=8)]

# peer -> (top-level package, distribution, the layer's file inside the package, that file's module name)
_SOURCES: dict[str, tuple[str, str, str, str]] = {
    "torchrl": ("torchrl", "torchrl", "modules/models/batchrenorm.py", "torchrl.modules.models.batchrenorm"),
    "sb3-contrib": ("sb3_contrib", "sb3-contrib", "common/torch_layers.py", "sb3_contrib.common.torch_layers"),
    "sbx": ("sbx", "sbx-rl", "common/jax_layers.py", "sbx.common.jax_layers"),
}


@functools.cache
def load_source(peer: str) -> types.ModuleType:
    """The module of ``peer`` (``"torchrl"``, ``"sb3-contrib"`` or ``"sbx"``) that defines its Batch Renorm layer.

    Its normal import when that works; otherwise (the package's ``__init__`` needs tensordict, gymnasium or
    stable_baselines3, which a ``--no-deps`` install lacks) the one file, found in the installed distribution
    (``importlib.util.find_spec`` of the top-level package, else ``importlib.metadata``), loaded by path as a
    module of its own. That file imports only torch, or JAX and Flax.
    """
    if peer not in _SOURCES:
        raise ValueError(f"peer={peer!r}: expected one of {', '.join(_SOURCES)}")
    package, dist, rel, dotted = _SOURCES[peer]
    try:
        return importlib.import_module(dotted)
    except Exception:  # noqa: BLE001 - a package whose __init__ needs what is not installed: load the file
        pass
    path = None
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], *rel.split("/"))
    if path is None or not os.path.isfile(path):
        try:
            path = str(importlib.metadata.distribution(dist).locate_file(f"{package}/{rel}"))
        except importlib.metadata.PackageNotFoundError:
            path = None
    if path is None or not os.path.isfile(path):
        raise ImportError(f"{peer} is not installed (no {package}/{rel}): {PEERS[peer][1]}")
    name = f"_renorm_peer_{package}_{os.path.splitext(os.path.basename(rel))[0]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclasses.dataclass(frozen=True)
class Cause:
    """Why an implementation departs from the paper, and where, in the version tested.

    ``file`` is the path inside the installed distribution, ``line`` the line it happens at and ``marker`` a few
    characters that line holds (``tests/test_peers.py`` checks them against the installed file). ``kind``:
    ``"deviation"`` (it changes a quantity the driver compares; the tests re-derive it in NumPy), ``"error"`` (the
    layer raises) or ``"note"`` (an API limit the adapter works around, or numerics the peer cases do not reach).
    Where it applies: ``warmup_only`` (only on a case with a warm-up), ``dtypes`` and ``backends`` (the Keras
    backends; ``None``: all).
    """

    text: str
    file: str
    line: int
    marker: str
    kind: str = "deviation"
    warmup_only: bool = False
    dtypes: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def applies(self, *, warmup: bool = True, dtype: str | None = None, backend: str | None = None) -> bool:
        """Whether it applies to a run with (or without) a warm-up, in ``dtype``, on Keras ``backend``."""
        return (
            (warmup or not self.warmup_only)
            and (dtype is None or self.dtypes is None or dtype in self.dtypes)
            and (backend is None or self.backends is None or backend in self.backends)
        )


_KERAS_BN = "keras/src/layers/normalization/batch_normalization.py"
_KERAS_TORCH_MOMENTS = Cause(
    "on the torch backend the batch variance is E[x^2] - E[x]^2 (keras.ops.moments), which docs/SPEC.md section 8 "
    "rules out: it cancels on inputs whose mean is large next to their spread (the peer cases' are not)",
    "keras/src/backend/torch/nn.py",
    980,
    "torch.mean(",
    kind="note",
    backends=("torch",),
)
_KERAS_FLOAT64 = Cause(
    "a float64 layer normalizes in float32 outside TensorFlow: the compute dtype is backend.result_type(input, "
    "'float32'), and Keras's type promotion turns float64 into float32 on the JAX and torch backends "
    "(keras/src/backend/common/dtypes.py:240); outputs and state are float64, their values float32-accurate",
    _KERAS_BN,
    345,
    "backend.result_type(inputs.dtype",
    dtypes=("float64",),
    backends=("jax", "torch"),
)
_KERAS_TWO_COPIES = Cause(
    "two copies of the moving statistics: r and d use renorm_mean/renorm_stddev (updated with renorm_momentum), "
    "inference uses moving_mean and moving_variance = moving_stddev^2 - epsilon (updated with momentum); the paper "
    "has one pair, so renorm_momentum must equal momentum",
    _KERAS_BN,
    561,
    "self.renorm_mean.assign(",
    kind="note",
)
_TF_KERAS_BN = "tf_keras/src/layers/normalization/batch_normalization.py"
_TF_KERAS_FLOAT64 = Cause(
    "a float64 layer with renorm raises TypeError on its first training step: tf.sqrt(self.epsilon) is a float32 "
    "tensor, and tf.maximum with the float64 renorm_stddev refuses the mix",
    _TF_KERAS_BN,
    1061,
    "tf.maximum(self.renorm_stddev",
    kind="error",
    dtypes=("float64",),
)
_TORCHRL = "torchrl/modules/models/batchrenorm.py"
_SB3 = "sb3_contrib/common/torch_layers.py"
_SBX = "sbx/common/jax_layers.py"

# configuration key -> version -> causes. The version is the distribution's (keras, tf_keras, torchrl, sb3-contrib,
# sbx-rl); an adapter on a version not listed reports its numbers with the causes "not recorded for this version".
CAUSES: dict[str, dict[str, list[Cause]]] = {
    "keras": {
        "3.15.1": [
            Cause(
                "a renorm_clipping without 'rmin' leaves r unclipped below (Keras documents a missing rmin as 0), "
                "so r can fall under 1/rmax",
                _KERAS_BN,
                508,
                "if rmin is not None",
            ),
            _KERAS_FLOAT64,
            _KERAS_TWO_COPIES,
            _KERAS_TORCH_MOMENTS,
        ],
    },
    "keras-conforming": {"3.15.1": [_KERAS_FLOAT64, _KERAS_TWO_COPIES, _KERAS_TORCH_MOMENTS]},
    "tf_keras": {
        "2.21.0": [
            Cause(
                "a renorm_clipping without 'rmin' leaves r unclipped below, so r can fall under 1/rmax",
                _TF_KERAS_BN,
                1072,
                "if rmin is not None",
            ),
            _TF_KERAS_FLOAT64,
        ],
    },
    "tf_keras-conforming": {"2.21.0": [_TF_KERAS_FLOAT64]},
    "torchrl": {
        "0.14.1": [
            Cause(
                "the moving statistic is an average of the unbiased batch variance (times N/(N-1)), not of the "
                "standard deviation sqrt(var + eps); r, d and inference read sqrt(running_var + eps)",
                _TORCHRL,
                110,
                "unbiased_var =",
            ),
            Cause(
                "num_batches_tracked.clamp_max(warmup_steps) is not in place, so the counter keeps growing and "
                "the warm-up factor num_batches_tracked // warmup_steps (line 104) goes 1, 2, 3, ... after the "
                "warm-up: r - 1 and d are multiplied by it, past rmax and dmax",
                _TORCHRL,
                114,
                "clamp_max(",
                warmup_only=True,
            ),
        ],
    },
    "sb3-contrib": {
        "2.9.2": [
            Cause(
                "'steps > warmup_steps' is off by one: with warmup_steps=W the first W + 1 steps are batch norm "
                "(step 0 is batch norm even with warmup_steps=0)",
                _SB3,
                78,
                "self.steps > self.warmup_steps",
            ),
            Cause(
                "the batch variance is the unbiased one (torch's var, N - 1), in r, d, the output and the moving "
                "average",
                _SB3,
                71,
                "x.var(dim=0)",
            ),
            Cause(
                "the output is written as batch norm with mean mu - d sqrt(var) / r and variance var / r^2, and "
                "epsilon is added to the latter: ((x - mu) r + d sqrt(var)) / sqrt(var + r^2 eps) instead of "
                "(x - mu) r / sqrt(var + eps) + d (epsilon enters as r^2 eps, d is scaled by "
                "sqrt(var / (var + r^2 eps)) and carries a gradient through var)",
                _SB3,
                105,
                "(custom_var[None] + self.eps).sqrt()",
            ),
            Cause(
                "the moving statistic is an average of the (unbiased) variance, not of the standard deviation",
                _SB3,
                97,
                "self.ra_var +=",
            ),
            Cause(
                "rmax and dmax are not constructor arguments (3 and 5); the adapter sets the attributes",
                _SB3,
                53,
                "self.rmax = 3.0",
                kind="note",
            ),
        ],
    },
    "sbx": {
        "0.28.0": [
            Cause(
                "the output is batch norm with mean mu - d sqrt(var) / r and variance var / r^2 through Flax's "
                "batch-norm normalization, which adds epsilon: ((x - mu) r + d sqrt(var)) / sqrt(var + r^2 eps) "
                "instead of (x - mu) r / sqrt(var + eps) + d (epsilon enters as r^2 eps, d is scaled by "
                "sqrt(var / (var + r^2 eps)) and carries a gradient through var)",
                _SBX,
                181,
                "affine_var = batch_var / (r**2)",
            ),
            Cause(
                "the moving statistic is an average of the batch variance, not of the standard deviation",
                _SBX,
                191,
                "ra_var.value = self.momentum",
            ),
            Cause(
                "the moving mean and variance are created in float32 whatever the dtype, so a float64 module keeps "
                "float32 state",
                _SBX,
                127,
                "jnp.zeros(s, jnp.float32)",
                dtypes=("float64",),
            ),
            Cause(
                "rmax and dmax are batch_stats variables initialised to 3 and 5, not module attributes; the adapter "
                "writes them into the state",
                _SBX,
                132,
                "r_max = self.variable(",
                kind="note",
            ),
            Cause(
                "the batch variance is Flax's default E[x^2] - E[x]^2 (use_fast_variance), which docs/SPEC.md "
                "section 8 rules out (it cancels on inputs whose mean is large next to their spread)",
                _SBX,
                155,
                "_compute_stats(",
                kind="note",
            ),
        ],
    },
}


def causes(adapter: Adapter, version: str | None = None, **where) -> list[Cause] | None:
    """The recorded causes of ``adapter``'s configuration at ``version`` (default: the installed one), ``None``
    where none are recorded; ``where``: :meth:`Cause.applies`'s ``warmup``, ``dtype``, ``backend``.

    >>> [c.where for c in causes(TorchRLAdapter(), "0.14.1", warmup=False)]
    ['torchrl/modules/models/batchrenorm.py:110']
    """
    found = CAUSES.get(adapter.key, {}).get(version or adapter.peer_version())
    if found is None:
        return None
    return [c for c in found if c.applies(**where)]


class _Peer(Adapter):
    """What the peers' adapters share: the cases they run, the versions they report."""

    peer = ""  # the peer's name in PEERS
    key = ""  # the configuration's key in CAUSES
    dist = ""  # the peer's distribution
    framework: tuple[str, ...] = ()  # the distributions of the frameworks it runs on
    has_warmup = False  # the layer has a warm-up (batch norm for the first steps): the case's warmup_steps is used
    ranks: tuple[int, ...] | None = None  # the input ranks the layer normalizes correctly (None: every rank >= 2)

    def peer_version(self) -> str:
        return _version(self.dist)

    def versions(self) -> dict[str, str]:
        return {self.dist: self.peer_version(), **{d: _version(d) for d in self.framework}}

    def supports(self, case: Case, dtype: str) -> str | None:
        if dtype not in ("float32", "float64"):
            return "the peers run in float32 and float64"
        if case.microbatch_size is not None:
            return "no micro-batches (separately normalized groups of the batch)"
        if case.rmax_steps > case.warmup_steps or case.dmax_steps > case.warmup_steps:
            return "no ramp of rmax and dmax"
        if case.warmup_steps and not self.has_warmup:
            return "no warm-up"
        if self.ranks is not None and len(case.shape) not in self.ranks:
            return f"normalizes over dim 0 only: inputs of rank {', '.join(map(str, self.ranks))}"
        return None


# Keras 3 and tf_keras: BatchNormalization(renorm=True).


def _keras_clipping(conforming: bool, rmax: float, dmax: float) -> dict:
    return {"rmin": 1.0 / rmax, "rmax": rmax, "dmax": dmax} if conforming else {"rmax": rmax, "dmax": dmax}


def _keras_settings(conforming: bool) -> dict:
    return {
        "renorm": True,
        "renorm_clipping": "{'rmin': 1/rmax, 'rmax': rmax, 'dmax': dmax}"
        if conforming
        else "{'rmax': rmax, 'dmax': dmax} (no 'rmin', as most users write it: Keras takes 0)",
        "renorm_momentum": "momentum" if conforming else "0.99 (the default)",
        "momentum": "momentum",
        "epsilon": "epsilon",
        "state compared": "renorm_mean, renorm_stddev (moving_mean and moving_variance through inference)",
    }


class _KerasBase(_Peer):
    layout = "axis"

    def __init__(self, *, conforming: bool = False):
        self.conforming = conforming
        self.settings = _keras_settings(conforming)

    @property
    def key(self) -> str:
        return self.dist + ("-conforming" if self.conforming else "")

    def _kwargs(self, case: Case, momentum: float, epsilon: float) -> dict:
        kw = dict(
            axis=case.axis,
            momentum=momentum,
            epsilon=epsilon,
            center=case.center,
            scale=case.scale,
            renorm=True,
            renorm_clipping=_keras_clipping(self.conforming, case.rmax, case.dmax),
        )
        if self.conforming:
            kw["renorm_momentum"] = momentum
        return kw

    @staticmethod
    def _assign(layer, params: dict, epsilon: float) -> None:
        """The driver's initial state into both of Keras's copies of the moving statistics."""
        stddev = np.asarray(params["stddev"], np.float64)
        values = {
            "gamma": params["gamma"],
            "beta": params["beta"],
            "moving_mean": params["mean"],
            "renorm_mean": params["mean"],
            "moving_stddev": stddev,
            "renorm_stddev": stddev,
            "moving_variance": stddev**2 - epsilon,
        }
        for attr, value in values.items():
            if getattr(layer, attr, None) is not None:
                getattr(layer, attr).assign(np.asarray(value, np.float64))


class KerasBNAdapter(_KerasBase):
    """Keras 3's ``keras.layers.BatchNormalization(renorm=True)`` on the current Keras backend.

    ``conforming=False``: ``renorm_clipping={"rmax": rmax, "dmax": dmax}`` and the default ``renorm_momentum``, as
    most users write it; ``True``: ``rmin=1/rmax`` added and ``renorm_momentum=momentum``.

    Keras keeps two pairs of moving statistics: ``renorm_mean``/``renorm_stddev``, from which ``r`` and ``d`` are
    computed and which ``renorm_momentum`` updates, and ``moving_mean``/``moving_stddev`` (with ``moving_variance
    = moving_stddev**2 - epsilon``), which ``momentum`` updates and inference reads. The paper has one pair, used by
    both. The adapter reports the first as the moving statistics: they are what makes a training step Batch
    Renorm (the paper's ``mu`` and ``sigma`` in ``r`` and ``d``); the second is checked through the inference
    output, and with ``renorm_momentum == momentum`` the two pairs are equal.
    """

    peer = "keras"
    dist = "keras"

    @property
    def name(self) -> str:
        import keras

        how = "rmin=1/rmax, renorm_momentum=momentum" if self.conforming else "renorm_clipping={rmax, dmax}"
        return f"keras.layers.BatchNormalization(renorm=True), {how} (Keras {keras.backend.backend()} backend)"

    @property
    def framework(self) -> tuple[str, ...]:
        import keras

        return ({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(keras.backend.backend(), "?"),)

    def supports(self, case, dtype):
        import keras

        if dtype == "float64" and keras.backend.backend() == "jax":
            import jax

            if not jax.config.jax_enable_x64:
                return "float64 on the JAX backend needs jax_enable_x64 (JAX_ENABLE_X64=1)"
        return super().supports(case, dtype)

    def build(self, case, *, momentum, epsilon, params, dtype):
        import keras
        from keras import ops

        from renorm.testing.adapters import _keras_step

        layer = keras.layers.BatchNormalization(dtype=dtype, **self._kwargs(case, momentum, epsilon))
        layer.build(case.shape)
        self._assign(layer, params, epsilon)
        step = _keras_step(layer, keras.backend.backend(), "function")

        def np_(v):  # a copy (the torch backend may share a float64 variable's buffer)
            return np.array(ops.convert_to_numpy(ops.cast(v, "float64")), np.float64, copy=True)

        def name(v):
            return keras.backend.standardize_dtype(v.dtype)

        class Layer:
            def train(self, x, dy, mask=None):
                kmask = None if mask is None else ops.convert_to_tensor(np.squeeze(mask, case.axis))
                y, grads = step(
                    ops.convert_to_tensor(np.asarray(x, dtype)), ops.convert_to_tensor(np.asarray(dy, dtype)), kmask
                )
                grads = list(grads)
                dx = grads.pop(0)
                dg = grads.pop(0) if case.scale else None
                db = grads.pop(0) if case.center else None
                return dict(
                    y=np_(y),
                    dx=np_(dx),
                    dgamma=None if dg is None else np_(dg),
                    dbeta=None if db is None else np_(db),
                    mean=np_(layer.renorm_mean),
                    stddev=np_(layer.renorm_stddev),
                    dtypes={
                        "y": name(y),
                        "dx": name(dx),
                        "mean": name(layer.renorm_mean),
                        "stddev": name(layer.renorm_stddev),
                    },
                )

            def infer(self, x):
                return np_(layer(ops.convert_to_tensor(np.asarray(x, dtype)), training=False))

        return Layer()


class TFKerasBNAdapter(_KerasBase):
    """tf_keras's (Keras 2's) ``tf_keras.layers.BatchNormalization(renorm=True)``, in a ``tf.function``.

    The same two configurations and the same choice of moving statistics as :class:`KerasBNAdapter`.
    """

    peer = "tf_keras"
    dist = "tf_keras"
    framework = ("tensorflow",)

    @property
    def name(self) -> str:
        how = "rmin=1/rmax, renorm_momentum=momentum" if self.conforming else "renorm_clipping={rmax, dmax}"
        return f"tf_keras.layers.BatchNormalization(renorm=True), {how}"

    def build(self, case, *, momentum, epsilon, params, dtype):
        import tensorflow as tf
        import tf_keras

        layer = tf_keras.layers.BatchNormalization(dtype=dtype, **self._kwargs(case, momentum, epsilon))
        layer.build(case.shape)
        self._assign(layer, params, epsilon)

        @tf.function
        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * dy)
            return y, tape.gradient(loss, [x, *layer.trainable_variables])

        def np_(v):
            return np.asarray(tf.cast(v, tf.float64).numpy())

        class Layer:
            def train(self, x, dy, mask=None):
                if mask is not None:
                    raise TypeError("the adapter passes no mask to tf_keras")
                y, grads = step(tf.constant(x, dtype), tf.constant(dy, dtype))
                grads = list(grads)
                dx = grads.pop(0)
                dg = grads.pop(0) if case.scale else None
                db = grads.pop(0) if case.center else None
                return dict(
                    y=np_(y),
                    dx=np_(dx),
                    dgamma=None if dg is None else np_(dg),
                    dbeta=None if db is None else np_(db),
                    mean=np_(layer.renorm_mean),
                    stddev=np_(layer.renorm_stddev),
                    dtypes={
                        "y": y.dtype.name,
                        "dx": dx.dtype.name,
                        "mean": layer.renorm_mean.dtype.name,
                        "stddev": layer.renorm_stddev.dtype.name,
                    },
                )

            def infer(self, x):
                return np_(layer(tf.constant(x, dtype), training=False))

        return Layer()


# PyTorch: torchrl and sb3-contrib, features on dim 1, a moving variance, PyTorch's momentum (the rate).


class _TorchPeer(_Peer):
    momentum_form = "rate"
    statistic = "variance"
    layout = "channels_first"
    framework = ("torch",)
    names: dict[str, str] = {}  # weight, bias, mean, var, step -> the module's attribute

    def __init__(self, *, device: str | None = None):
        self._device = device

    def device(self):
        return self._device or "cpu"

    def _module(self, case: Case, *, rate: float, epsilon: float):
        raise NotImplementedError

    def build(self, case, *, momentum, epsilon, params, dtype):
        import torch

        tdt = getattr(torch, dtype)
        dev = torch.device(self._device or "cpu")
        m = self._module(case, rate=momentum, epsilon=epsilon).to(device=dev, dtype=tdt)
        n = self.names
        weight, bias = getattr(m, n["weight"]), getattr(m, n["bias"])
        mean, var = getattr(m, n["mean"]), getattr(m, n["var"])
        c = case.num_features
        with torch.no_grad():
            weight.copy_(torch.as_tensor(params["gamma"] if case.scale else np.ones(c)))
            bias.copy_(torch.as_tensor(params["beta"] if case.center else np.zeros(c)))
            mean.copy_(torch.as_tensor(params["mean"]))
            var.copy_(torch.as_tensor(np.asarray(params["stddev"], np.float64) ** 2 - epsilon))
        weight.requires_grad_(case.scale)  # the layer is always affine: without scale, gamma stays 1, untrained
        bias.requires_grad_(case.center)

        def np_(t):  # a copy: in float64 on the CPU, .numpy() would share the buffer the next step updates
            return t.detach().to("cpu", torch.float64).numpy().copy()

        def name(t):
            return str(t.dtype).removeprefix("torch.")

        class Layer:
            def train(self, x, dy, mask=None):
                if mask is not None:
                    raise TypeError("the layer takes no mask")
                m.train()
                m.zero_grad(set_to_none=True)
                xt = torch.as_tensor(x, device=dev).to(tdt).requires_grad_(True)
                y = m(xt)
                y.backward(torch.as_tensor(dy, device=dev).to(tdt))
                return dict(
                    y=np_(y),
                    dx=np_(xt.grad),
                    dgamma=np_(weight.grad) if case.scale else None,
                    dbeta=np_(bias.grad) if case.center else None,
                    mean=np_(mean),
                    variance=np_(var),
                    step=int(getattr(m, n["step"])),
                    dtypes={"y": name(y), "dx": name(xt.grad), "mean": name(mean), "variance": name(var)},
                )

            def infer(self, x):
                m.eval()
                with torch.no_grad():
                    return np_(m(torch.as_tensor(x, device=dev).to(tdt)))

        return Layer()


class TorchRLAdapter(_TorchPeer):
    """torchrl's ``torchrl.modules.BatchRenorm1d``: ``momentum`` (PyTorch's rate), ``eps``, ``max_r=rmax``,
    ``max_d=dmax``, ``warmup_steps`` the case's (0 on the peer cases), ``smooth=False`` (``smooth=True`` scales
    ``r - 1`` and ``d`` during the warm-up, not the limits: no schedule of the paper's).

    The layer normalizes over every dim but 1, so any rank runs. Its state is ``running_mean`` and
    ``running_var`` (compared as ``sqrt(running_var + eps)``), its counter ``num_batches_tracked``.
    """

    peer = "torchrl"
    key = "torchrl"
    dist = "torchrl"
    has_warmup = True
    name = "torchrl BatchRenorm1d"
    names = dict(weight="weight", bias="bias", mean="running_mean", var="running_var", step="num_batches_tracked")
    settings = {
        "momentum": "1 - momentum (PyTorch's rate)",
        "eps": "epsilon",
        "max_r": "rmax",
        "max_d": "dmax",
        "warmup_steps": "the case's warmup_steps",
        "smooth": False,
    }

    def _module(self, case, *, rate, epsilon):
        cls = load_source("torchrl").BatchRenorm1d
        return cls(
            case.num_features,
            momentum=rate,
            eps=epsilon,
            max_r=case.rmax,
            max_d=case.dmax,
            warmup_steps=case.warmup_steps,
            smooth=False,
        )


class SB3ContribAdapter(_TorchPeer):
    """sb3-contrib's ``sb3_contrib.common.torch_layers.BatchRenorm1d``: ``eps``, ``momentum`` (PyTorch's rate),
    ``warmup_steps`` the case's (0 on the peer cases), and the attributes ``rmax``, ``dmax`` set after
    construction (the constructor fixes them at 3 and 5).

    The layer reduces over dim 0 only, so it runs 2-D inputs ``(batch, features)``. Its state is ``ra_mean`` and
    ``ra_var`` (compared as ``sqrt(ra_var + eps)``), its counter ``steps``.
    """

    peer = "sb3-contrib"
    key = "sb3-contrib"
    dist = "sb3-contrib"
    has_warmup = True
    ranks = (2,)
    name = "sb3-contrib BatchRenorm1d"
    names = dict(weight="scale", bias="bias", mean="ra_mean", var="ra_var", step="steps")
    settings = {
        "momentum": "1 - momentum (PyTorch's rate)",
        "eps": "epsilon",
        "affine": True,
        "warmup_steps": "the case's warmup_steps",
        "rmax, dmax": "rmax, dmax, set as attributes",
    }

    def _module(self, case, *, rate, epsilon):
        m = load_source("sb3-contrib").BatchRenorm1d(
            case.num_features, eps=epsilon, momentum=rate, affine=True, warmup_steps=case.warmup_steps
        )
        m.rmax, m.dmax = float(case.rmax), float(case.dmax)
        return m


class SbxAdapter(_Peer):
    """sbx's ``sbx.common.jax_layers.BatchRenorm`` (Flax linen), jitted: ``momentum``, ``epsilon``,
    ``warmup_steps`` the case's (0 on the peer cases), ``axis``, ``use_scale``, ``use_bias``, and ``r_max``,
    ``d_max`` written into its ``batch_stats`` (where the module keeps them, initialised to 3 and 5).

    Its state is ``batch_stats`` ``mean`` and ``var`` (compared as ``sqrt(var + epsilon)``; the module creates them
    in float32 whatever the dtype), its counter ``steps``. float64 needs ``jax_enable_x64``.
    """

    peer = "sbx"
    key = "sbx"
    dist = "sbx-rl"
    framework = ("jax", "flax")
    has_warmup = True
    statistic = "variance"
    layout = "axis"
    name = "sbx BatchRenorm (Flax linen)"
    settings = {
        "momentum": "momentum",
        "epsilon": "epsilon",
        "warmup_steps": "the case's warmup_steps",
        "batch_stats r_max, d_max": "rmax, dmax",
        "dtype": None,
    }

    def __init__(self, *, device: str | None = None):
        self._device = device

    def device(self):
        import jax

        from renorm.testing.adapters import _jax_device

        d = _jax_device(self._device)
        return str(d if d is not None else jax.devices()[0])

    def supports(self, case, dtype):
        import jax

        if dtype == "float64" and not jax.config.jax_enable_x64:
            return "float64 needs jax.config.update('jax_enable_x64', True)"
        return super().supports(case, dtype)

    def build(self, case, *, momentum, epsilon, params, dtype):
        import jax
        import jax.numpy as jnp

        from renorm.testing.adapters import _jax_device

        pdt = jnp.float64 if dtype == "float64" else jnp.float32
        xdt = pdt
        dev = _jax_device(self._device)
        put = (lambda a: jax.device_put(a, dev)) if dev is not None else (lambda a: a)
        module = load_source("sbx").BatchRenorm(
            axis=case.axis,
            momentum=momentum,
            epsilon=epsilon,
            warmup_steps=case.warmup_steps,
            use_bias=case.center,
            use_scale=case.scale,
            param_dtype=pdt,
        )
        init = module.init(jax.random.PRNGKey(0), jnp.zeros(case.shape, xdt), use_running_average=False)
        p = {}
        if case.scale:
            p["scale"] = put(jnp.asarray(params["gamma"], pdt))
        if case.center:
            p["bias"] = put(jnp.asarray(params["beta"], pdt))
        stats = dict(init["batch_stats"])
        sdt = stats["mean"].dtype  # the module's own (float32)
        stats["mean"] = put(jnp.asarray(params["mean"], sdt))
        stats["var"] = put(jnp.asarray(np.asarray(params["stddev"], np.float64) ** 2 - epsilon, sdt))
        stats["r_max"] = put(jnp.asarray(case.rmax, pdt))
        stats["d_max"] = put(jnp.asarray(case.dmax, pdt))
        state = {"params": p, "stats": stats}

        @jax.jit
        def step(params, stats, x, dy):
            def fwd(params, x):
                return module.apply(
                    {"params": params, "batch_stats": stats}, x, use_running_average=False, mutable=["batch_stats"]
                )

            y, vjp, upd = jax.vjp(fwd, params, x, has_aux=True)
            dparams, dx = vjp(dy.astype(y.dtype))
            return y, dparams, dx, upd["batch_stats"]

        @jax.jit
        def infer(params, stats, x):
            return module.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)

        def np_(a):
            return np.asarray(jnp.asarray(a, pdt), np.float64)

        class Layer:
            def train(self, x, dy, mask=None):
                if mask is not None:
                    raise TypeError("the module takes no mask")
                y, dp, dx, new = step(
                    state["params"], state["stats"], put(jnp.asarray(x, xdt)), put(jnp.asarray(dy, xdt))
                )
                state["stats"] = new
                return dict(
                    y=np_(y),
                    dx=np_(dx),
                    dgamma=np_(dp["scale"]) if "scale" in dp else None,
                    dbeta=np_(dp["bias"]) if "bias" in dp else None,
                    mean=np_(new["mean"]),
                    variance=np_(new["var"]),
                    step=int(new["steps"]),
                    dtypes={
                        "y": y.dtype.name,
                        "dx": dx.dtype.name,
                        "mean": new["mean"].dtype.name,
                        "variance": new["var"].dtype.name,
                    },
                )

            def infer(self, x):
                return np_(infer(state["params"], state["stats"], put(jnp.asarray(x, xdt))))

        return Layer()


def peer_adapters(name: str, *, device: str | None = None) -> list[Adapter]:
    """The adapters of peer ``name`` (one of :data:`PEERS`); ``device`` for the torch and JAX peers.

    >>> [a.key for a in peer_adapters("torchrl")]
    ['torchrl']
    """
    if name == "keras":
        return [KerasBNAdapter(conforming=False), KerasBNAdapter(conforming=True)]
    if name == "tf_keras":
        return [TFKerasBNAdapter(conforming=False), TFKerasBNAdapter(conforming=True)]
    if name == "torchrl":
        return [TorchRLAdapter(device=device)]
    if name == "sb3-contrib":
        return [SB3ContribAdapter(device=device)]
    if name == "sbx":
        return [SbxAdapter(device=device)]
    raise ValueError(f"peer={name!r}: expected one of {', '.join(PEERS)}")
