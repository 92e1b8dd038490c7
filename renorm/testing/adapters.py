"""Adapters for this project's own implementations: the oracle, the Keras layer (any Keras backend), the TensorFlow
function, Flax linen and nnx, PyTorch eager and compiled. Each imports its framework only when it is built.

>>> from renorm.testing import CASES, check
>>> check(OracleAdapter(), CASES[:1], dtype="float64").passed
True
"""

from __future__ import annotations

import contextlib
import importlib.metadata

import numpy as np

from renorm.schedule import ClipSchedule
from renorm.testing._driver import Adapter

__all__ = [
    "OracleAdapter",
    "KerasAdapter",
    "TFFunctionAdapter",
    "LinenAdapter",
    "NNXAdapter",
    "TorchAdapter",
    "BACKENDS",
    "adapter_for",
]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _renorm_version() -> str:
    import renorm

    return renorm.__version__


class OracleAdapter(Adapter):
    """The oracle itself in ``dtype`` (``float64`` or ``float32``): the driver's own check, and an adapter's model.

    >>> from renorm.testing import CASES, check
    >>> check(OracleAdapter(), CASES[:1], dtype="float64").results[0].errors["y"]
    0.0
    """

    name = "renorm.numpy_ref (oracle)"

    def __init__(self, dtype: str | None = None):
        self.dtype = dtype

    def versions(self) -> dict[str, str]:
        return {"renorm": _renorm_version(), "numpy": np.__version__}

    def supports(self, case, dtype):
        return None if dtype in ("float64", "float32") else "NumPy has no bfloat16; the oracle runs in float32 or 64"

    def build(self, case, *, momentum, epsilon, params, dtype):
        from renorm.numpy_ref import BatchRenormReference

        np_dtype = np.dtype(self.dtype or dtype)
        ref = BatchRenormReference(
            case.num_features,
            momentum=momentum,
            epsilon=epsilon,
            center=case.center,
            scale=case.scale,
            dtype=np_dtype,
            **case.layer_kwargs(),
            **params,
        )

        class Layer:
            def train(self, x, dy, mask=None):
                y = ref.train(np.asarray(x, np_dtype), mask=mask)
                dx, dg, db = ref.backward(np.asarray(dy, np_dtype))
                return dict(
                    y=y,
                    dx=dx,
                    dgamma=dg,
                    dbeta=db,
                    mean=ref.mean,
                    stddev=ref.stddev,
                    step=ref.step,
                    r_clipped=ref.r_clipped,
                    d_clipped=ref.d_clipped,
                )

            def infer(self, x):
                return ref.infer(np.asarray(x, np_dtype))

        return Layer()


class KerasAdapter(Adapter):
    """``renorm.keras.BatchRenormalization`` on the current Keras backend (``KERAS_BACKEND``).

    ``mode``: ``"eager"``, ``"function"`` (a traced step: ``tf.function`` on TensorFlow, ``jax.jit`` on JAX) or
    ``"jit"`` (XLA on TensorFlow); ``explicit_gradient`` as the layer's. float16 and bfloat16 run under Keras's
    ``mixed_float16`` / ``mixed_bfloat16`` policies (float32 variables).
    """

    layout = "axis"

    def __init__(
        self, *, mode: str = "function", explicit_gradient: bool = True, device: str | None = None, **layer_kwargs
    ):
        if mode not in ("eager", "function", "jit"):
            raise ValueError(f"mode={mode!r}: expected 'eager', 'function' or 'jit'")
        self.mode, self.explicit_gradient, self.layer_kwargs = mode, explicit_gradient, layer_kwargs
        self._device = _keras_device_name(device)

    @property
    def name(self) -> str:
        import keras

        grad = "explicit gradient" if self.explicit_gradient else "autodiff"
        return f"renorm.keras.BatchRenormalization (Keras {keras.backend.backend()} backend, {self.mode}, {grad})"

    def versions(self):
        import keras

        backend = keras.backend.backend()
        dist = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend, backend)
        return {"renorm": _renorm_version(), "keras": keras.__version__, dist: _version(dist)}

    def device(self):
        import keras

        if self._device is not None:
            return self._device
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
        if keras.backend.backend() == "jax":
            import jax

            return jax.devices()[0].platform
        if keras.backend.backend() == "torch":
            from keras.src.backend.torch.core import get_device

            return str(get_device())
        return "cpu"

    def supports(self, case, dtype):
        import keras

        if self.mode == "jit" and keras.backend.backend() != "tensorflow":
            return "mode='jit' is TensorFlow's XLA"
        return None

    def build(self, case, *, momentum, epsilon, params, dtype):
        import keras

        on = (lambda: keras.device(self._device)) if self._device else contextlib.nullcontext
        with on():
            return self._build(case, momentum=momentum, epsilon=epsilon, params=params, dtype=dtype, on=on)

    def _build(self, case, *, momentum, epsilon, params, dtype, on):
        import keras
        from keras import ops

        from renorm.keras import BatchRenormalization

        backend = keras.backend.backend()
        layer_dtype = dtype if dtype in ("float64", "float32") else f"mixed_{dtype}"
        layer = BatchRenormalization(
            momentum=momentum,
            epsilon=epsilon,
            center=case.center,
            scale=case.scale,
            dtype=layer_dtype,
            explicit_gradient=self.explicit_gradient,
            **case.layer_kwargs(),
            **self.layer_kwargs,
        )
        layer.build(case.shape)
        self.last_layer = layer  # for tests that inspect the layer after the run
        for attr, key in (("gamma", "gamma"), ("beta", "beta"), ("moving_mean", "mean"), ("moving_stddev", "stddev")):
            if getattr(layer, attr) is not None:
                getattr(layer, attr).assign(params[key])
        cdt = layer.compute_dtype
        step = _keras_step(layer, backend, self.mode)

        def np_(v):
            return np.asarray(ops.convert_to_numpy(ops.cast(v, "float64") if v is not None else v))

        def name(v):
            return keras.backend.standardize_dtype(v.dtype)

        class Layer:
            def train(self, x, dy, mask=None):
                with on():
                    return self._train(x, dy, mask)

            def _train(self, x, dy, mask):
                xt = ops.cast(ops.convert_to_tensor(x), cdt)
                kmask = None if mask is None else ops.convert_to_tensor(np.squeeze(mask, case.axis))
                dyt = ops.convert_to_tensor(np.asarray(dy, "float64" if cdt == "float64" else "float32"))
                y, grads = step(xt, dyt, kmask)
                grads = list(grads)
                dx = grads.pop(0)
                dg = grads.pop(0) if case.scale else None
                db = grads.pop(0) if case.center else None
                return dict(
                    y=np_(y),
                    dx=np_(dx),
                    dgamma=None if dg is None else np_(dg),
                    dbeta=None if db is None else np_(db),
                    mean=np_(layer.moving_mean),
                    stddev=np_(layer.moving_stddev),
                    step=int(np_(layer.step)),
                    r_clipped=float(np_(layer.r_clipped_fraction)),
                    d_clipped=float(np_(layer.d_clipped_fraction)),
                    dtypes={
                        "y": name(y),
                        "dx": name(dx),
                        "mean": name(layer.moving_mean),
                        "stddev": name(layer.moving_stddev),
                    },
                )

            def infer(self, x):
                with on():
                    return np_(layer(ops.cast(ops.convert_to_tensor(x), cdt), training=False))

        return Layer()


def _torch_device_name(device: str | None) -> str:
    """PyTorch's name for ``device``: ``gpu`` and ``gpu:N`` are ``cuda`` and ``cuda:N``; the default is the CPU.

    >>> _torch_device_name("gpu:1"), _torch_device_name(None)
    ('cuda:1', 'cpu')
    """
    if device in (None, "", "default"):
        return "cpu"
    kind, sep, index = device.partition(":")
    return ("cuda" if kind == "gpu" else kind) + sep + index


def _keras_device_name(device: str | None) -> str | None:
    """``cuda``, ``cuda:N``, ``gpu``, ``cpu`` as Keras's ``keras.device`` names them (``gpu:0``, ``cpu:0``)."""
    if device in (None, "", "default"):
        return None
    kind, _, index = device.partition(":")
    kind = {"cuda": "gpu"}.get(kind, kind)
    if kind not in ("cpu", "gpu", "tpu") or (index and not index.isdigit()):
        raise ValueError(f"device={device!r}: expected cpu, gpu, cuda or cuda:N")
    return f"{kind}:{index or 0}"


def _keras_step(layer, backend: str, mode: str):
    """``(x, dy, mask) -> (y, [dx, dgamma?, dbeta?])``: one training step of ``sum(y * dy)``, state assigned."""
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def loss(trainable, non_trainable, x, dy, mask):
            y, non_trainable = layer.stateless_call(trainable, non_trainable, x, training=True, mask=mask)
            return jnp.sum(y.astype(dy.dtype) * dy), (y, non_trainable)

        fn = jax.value_and_grad(loss, argnums=(2, 0), has_aux=True)
        if mode != "eager":
            fn = jax.jit(fn)

        def step(x, dy, mask):
            tv = [v.value for v in layer.trainable_variables]
            ntv = [v.value for v in layer.non_trainable_variables]
            (_, (y, ntv)), (dx, dtv) = fn(tv, ntv, x, dy, mask)
            for v, value in zip(layer.non_trainable_variables, ntv):
                v.assign(value)
            return y, [dx, *dtv]

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        def step(x, dy, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True, mask=mask)
                loss = tf.reduce_sum(tf.cast(y, dy.dtype) * dy)
            return y, tape.gradient(loss, [x, *layer.trainable_variables])

        return step if mode == "eager" else tf.function(step, jit_compile=(mode == "jit"))
    if backend == "torch":
        import torch

        def step(x, dy, mask):
            x = torch.as_tensor(x).clone().requires_grad_(True)
            for v in layer.trainable_variables:
                v.value.grad = None
            y = layer(x, training=True, mask=mask)
            torch.sum(y.to(dy.dtype) * dy).backward()
            return y.detach(), [x.grad] + [v.value.grad for v in layer.trainable_variables]

        return step
    raise ValueError(f"Keras backend {backend!r}: the adapter knows tensorflow, jax and torch")


class TFFunctionAdapter(Adapter):
    """``renorm.tf.batch_renorm``, the pure TensorFlow function, with the state kept by the adapter."""

    name = "renorm.tf.batch_renorm (TensorFlow function)"

    def __init__(
        self, *, mode: str = "function", explicit_gradient: bool = True, fused: bool | None = None, device=None
    ):
        self.mode, self.explicit_gradient, self.fused = mode, explicit_gradient, fused
        self._device = _keras_device_name(device)

    def versions(self):
        return {"renorm": _renorm_version(), "tensorflow": _version("tensorflow")}

    def device(self):
        import tensorflow as tf

        return self._device or ("gpu" if tf.config.list_logical_devices("GPU") else "cpu")

    def supports(self, case, dtype):
        return None if dtype in ("float64", "float32") else "the function takes one dtype; see the Keras layer"

    def build(self, case, *, momentum, epsilon, params, dtype):
        import tensorflow as tf

        on = (lambda: tf.device(self._device)) if self._device else contextlib.nullcontext
        with on():
            return _OnDevice(self._build(case, momentum=momentum, epsilon=epsilon, params=params, dtype=dtype), on)

    def _build(self, case, *, momentum, epsilon, params, dtype):
        import tensorflow as tf

        from renorm.tf import batch_renorm

        schedule = ClipSchedule(**case.schedule_kwargs)
        var = {k: None if params[k] is None else tf.Variable(params[k], dtype=dtype) for k in ("gamma", "beta")}
        state = {"mean": tf.constant(params["mean"], dtype), "stddev": tf.constant(params["stddev"], dtype), "step": 0}
        kw = dict(
            momentum=momentum,
            epsilon=epsilon,
            axis=case.axis,
            microbatch_size=case.microbatch_size,
            explicit_gradient=self.explicit_gradient,
            fused=self.fused,
        )

        def step(x, dy, mean, stddev, rmax, dmax, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = batch_renorm(
                    x, var["gamma"], var["beta"], mean, stddev, training=True, rmax=rmax, dmax=dmax, mask=mask, **kw
                )
                loss = tf.reduce_sum(out.y * dy)
            sources = [x] + [v for v in var.values() if v is not None]
            return out, tape.gradient(loss, sources)

        if self.mode != "eager":
            step = tf.function(step, jit_compile=(self.mode == "jit"))

        class Layer:
            def train(self, x, dy, mask=None):
                rmax, dmax = schedule.limits(float(state["step"]))
                kmask = None if mask is None else tf.constant(np.squeeze(mask, case.axis))
                out, grads = step(
                    tf.constant(x, dtype),
                    tf.constant(dy, dtype),
                    state["mean"],
                    state["stddev"],
                    tf.constant(rmax, dtype),
                    tf.constant(dmax, dtype),
                    kmask,
                )
                grads = list(grads)
                dx = grads.pop(0)
                if not bool(out.empty):
                    state["step"] += 1
                    state["mean"], state["stddev"] = out.moving_mean, out.moving_stddev
                return dict(
                    y=out.y.numpy(),
                    dx=dx.numpy(),
                    dgamma=grads.pop(0).numpy() if case.scale else None,
                    dbeta=grads.pop(0).numpy() if case.center else None,
                    mean=state["mean"].numpy(),
                    stddev=state["stddev"].numpy(),
                    step=state["step"],
                    r_clipped=float(out.r_clipped_fraction),
                    d_clipped=float(out.d_clipped_fraction),
                    dtypes={"y": out.y.dtype.name, "dx": dx.dtype.name, "mean": state["mean"].dtype.name},
                )

            def infer(self, x):
                return batch_renorm(
                    tf.constant(x, dtype),
                    var["gamma"],
                    var["beta"],
                    state["mean"],
                    state["stddev"],
                    training=False,
                    **kw,
                ).y.numpy()

        return Layer()


class _OnDevice:
    """A layer whose calls run inside ``on()`` (a device context)."""

    def __init__(self, layer, on):
        self.layer, self.on = layer, on

    def train(self, x, dy, mask=None):
        with self.on():
            return self.layer.train(x, dy, mask)

    def infer(self, x):
        with self.on():
            return self.layer.infer(x)


def _jax_device(device: str | None):
    import jax

    if device in (None, "", "default"):
        return None
    kind, _, index = device.partition(":")
    kind = {"cuda": "gpu"}.get(kind, kind)
    return jax.devices(kind)[int(index or 0)]


def _jax_dtype(dtype: str):
    import jax.numpy as jnp

    return {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[dtype]


def _jax_versions():
    return {"renorm": _renorm_version(), "jax": _version("jax"), "flax": _version("flax")}


class LinenAdapter(Adapter):
    """``renorm.jax.BatchRenorm`` (Flax linen), jitted; ``explicit_backward`` as the module's.

    float64 needs ``jax_enable_x64`` (the adapter skips float64 cases without it).
    """

    label = "renorm.jax.BatchRenorm (Flax linen"

    @property
    def name(self) -> str:
        return f"{self.label}, {'explicit backward' if self.explicit_backward else 'autodiff'})"

    def __init__(self, *, explicit_backward: bool = True, device: str | None = None, **module_kwargs):
        self.explicit_backward, self._device, self.module_kwargs = explicit_backward, device, module_kwargs

    def versions(self):
        return _jax_versions()

    def device(self):
        import jax

        d = _jax_device(self._device)
        return str(d if d is not None else jax.devices()[0])

    def supports(self, case, dtype):
        import jax

        if dtype == "float64" and not jax.config.jax_enable_x64:
            return "float64 needs jax.config.update('jax_enable_x64', True)"
        return None

    def build(self, case, *, momentum, epsilon, params, dtype):
        import jax
        import jax.numpy as jnp

        from renorm.jax import BatchRenorm

        pdt = jnp.float64 if dtype == "float64" else jnp.float32
        xdt = _jax_dtype(dtype)
        dev = _jax_device(self._device)
        module = BatchRenorm(
            momentum=momentum,
            epsilon=epsilon,
            use_bias=case.center,
            use_scale=case.scale,
            param_dtype=pdt,
            explicit_backward=self.explicit_backward,
            **case.layer_kwargs(),
            **self.module_kwargs,
        )
        put = (lambda a: jax.device_put(a, dev)) if dev is not None else (lambda a: a)
        p = {}
        if case.scale:
            p["scale"] = put(jnp.asarray(params["gamma"], pdt))
        if case.center:
            p["bias"] = put(jnp.asarray(params["beta"], pdt))
        state = {
            "params": p,
            "stats": {
                "mean": put(jnp.asarray(params["mean"], pdt)),
                "stddev": put(jnp.asarray(params["stddev"], pdt)),
                "step": put(jnp.zeros((), jnp.int32)),
            },
        }

        @jax.jit
        def step(params, stats, x, dy, mask):
            def fwd(params, x):
                return module.apply(
                    {"params": params, "batch_stats": stats},
                    x,
                    use_running_average=False,
                    mask=mask,
                    mutable=["batch_stats", "intermediates"],
                )

            y, vjp, upd = jax.vjp(fwd, params, x, has_aux=True)
            dparams, dx = vjp(dy.astype(y.dtype))
            return y, dparams, dx, upd["batch_stats"], upd["intermediates"]

        @jax.jit
        def infer(params, stats, x):
            return module.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)

        def np_(a):
            return np.asarray(
                jnp.asarray(a, jnp.float64) if dtype == "float64" else jnp.asarray(a, jnp.float32), np.float64
            )

        class Layer:
            def train(self, x, dy, mask=None):
                before = int(state["stats"]["step"])
                y, dp, dx, stats, inter = step(
                    state["params"],
                    state["stats"],
                    put(jnp.asarray(x, xdt)),
                    put(jnp.asarray(dy, xdt)),
                    None if mask is None else put(mask),
                )
                state["stats"] = stats
                stepped = int(stats["step"]) > before  # a call that selects nothing sows 0: no diagnostics kept
                return dict(
                    y=np_(y),
                    dx=np_(dx),
                    dgamma=np_(dp["scale"]) if "scale" in dp else None,
                    dbeta=np_(dp["bias"]) if "bias" in dp else None,
                    mean=np_(stats["mean"]),
                    stddev=np_(stats["stddev"]),
                    step=int(stats["step"]),
                    r_clipped=float(inter["r_clipped"][0]) if stepped else None,
                    d_clipped=float(inter["d_clipped"][0]) if stepped else None,
                    dtypes={
                        "y": y.dtype.name,
                        "dx": dx.dtype.name,
                        "mean": stats["mean"].dtype.name,
                        "stddev": stats["stddev"].dtype.name,
                    },
                )

            def infer(self, x):
                return np_(infer(state["params"], state["stats"], put(jnp.asarray(x, xdt))))

        return Layer()


class NNXAdapter(LinenAdapter):
    """``renorm.jax.nnx.BatchRenorm`` (Flax nnx), a jitted step with ``nnx.value_and_grad``."""

    label = "renorm.jax.nnx.BatchRenorm (Flax nnx"

    def build(self, case, *, momentum, epsilon, params, dtype):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from renorm.jax import nnx as rnnx

        pdt = jnp.float64 if dtype == "float64" else jnp.float32
        xdt = _jax_dtype(dtype)
        dev = _jax_device(self._device)
        put = (lambda a: jax.device_put(a, dev)) if dev is not None else (lambda a: a)
        layer = rnnx.BatchRenorm(
            case.num_features,
            momentum=momentum,
            epsilon=epsilon,
            use_bias=case.center,
            use_scale=case.scale,
            param_dtype=pdt,
            explicit_backward=self.explicit_backward,
            rngs=nnx.Rngs(0),
            **case.layer_kwargs(),
            **self.module_kwargs,
        )
        if case.scale:
            layer.scale[...] = put(jnp.asarray(params["gamma"], pdt))
        if case.center:
            layer.bias[...] = put(jnp.asarray(params["beta"], pdt))
        layer.mean[...] = put(jnp.asarray(params["mean"], pdt))
        layer.stddev[...] = put(jnp.asarray(params["stddev"], pdt))

        @nnx.jit
        def step(layer, x, dy, mask):
            def loss(layer, x):
                y = layer(x, mask=mask)
                return jnp.sum(y * dy.astype(y.dtype)), y

            (_, y), (g, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
            return y, dx, g

        infer = nnx.jit(lambda layer, x: layer(x, use_running_average=True))

        def np_(a):
            return np.asarray(jnp.asarray(a, jnp.float64 if dtype == "float64" else jnp.float32), np.float64)

        class Layer:
            def train(self, x, dy, mask=None):
                y, dx, g = step(
                    layer, put(jnp.asarray(x, xdt)), put(jnp.asarray(dy, xdt)), None if mask is None else put(mask)
                )
                return dict(
                    y=np_(y),
                    dx=np_(dx),
                    dgamma=np_(g.scale[...]) if case.scale else None,
                    dbeta=np_(g.bias[...]) if case.center else None,
                    mean=np_(layer.mean[...]),
                    stddev=np_(layer.stddev[...]),
                    step=int(layer.step[...]),
                    r_clipped=float(layer.r_clipped[...]),
                    d_clipped=float(layer.d_clipped[...]),
                    dtypes={
                        "y": y.dtype.name,
                        "dx": dx.dtype.name,
                        "mean": layer.mean[...].dtype.name,
                        "stddev": layer.stddev[...].dtype.name,
                    },
                )

            def infer(self, x):
                return np_(infer(layer, put(jnp.asarray(x, xdt))))

        return Layer()


class TorchAdapter(Adapter):
    """``renorm.torch.BatchRenorm1d/2d/3d`` (features on dim 1), eager or ``torch.compile``-d.

    ``compiled``: a ``torch.compile`` backend name (``"inductor"``, ``"aot_eager"``) or ``None``;
    ``explicit_backward`` as the module's; ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (default: CPU).
    """

    momentum_form = "rate"
    layout = "channels_first"

    def __init__(
        self,
        *,
        compiled: str | None = None,
        explicit_backward: bool = True,
        device: str | None = None,
        exported: bool = False,
        **module_kwargs,
    ):
        self.compiled, self.explicit_backward, self._device, self.module_kwargs = (
            compiled,
            explicit_backward,
            device,
            module_kwargs,
        )
        self.exported = exported  # torch.export the module in training mode first and train the exported program

    @property
    def name(self) -> str:
        how = f"torch.compile(backend={self.compiled!r})" if self.compiled else "eager"
        grad = "explicit backward" if self.explicit_backward else "autodiff"
        return f"renorm.torch.BatchRenorm (PyTorch, {how}, {grad})"

    def versions(self):
        return {"renorm": _renorm_version(), "torch": _version("torch")}

    def device(self):
        return _torch_device_name(self._device)

    def supports(self, case, dtype):
        if dtype == "float64" and (self._device or "cpu").startswith("mps"):
            return "MPS has no float64"
        return None

    def build(self, case, *, momentum, epsilon, params, dtype):
        import torch

        from renorm.torch import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

        tdt = getattr(torch, dtype)
        pdt = torch.float64 if dtype == "float64" else torch.float32
        dev = torch.device(_torch_device_name(self._device))
        cls = {2: BatchRenorm1d, 3: BatchRenorm1d, 4: BatchRenorm2d, 5: BatchRenorm3d}.get(len(case.shape), BatchRenorm)
        kw = {k: v for k, v in case.layer_kwargs().items() if k != "axis"}
        m = cls(
            case.num_features,
            eps=epsilon,
            momentum=momentum,
            affine=True,
            dtype=pdt,
            device=dev,
            explicit_backward=self.explicit_backward,
            **kw,
            **self.module_kwargs,
        )
        with torch.no_grad():
            c = case.num_features
            m.weight.copy_(torch.as_tensor(params["gamma"] if case.scale else np.ones(c)))
            m.bias.copy_(torch.as_tensor(params["beta"] if case.center else np.zeros(c)))
            m.running_mean.copy_(torch.as_tensor(params["mean"]))
            m.running_std.copy_(torch.as_tensor(params["stddev"]))
        m.weight.requires_grad_(case.scale)
        m.bias.requires_grad_(case.center)
        if self.compiled:
            torch._dynamo.reset()  # one compiled module per case: start each from an empty cache (recompile limit)
        fwd = torch.compile(m, backend=self.compiled, fullgraph=True) if self.compiled else m
        if self.exported:  # an exported program keeps the mode it was exported in: no inference call
            example = torch.zeros(np.moveaxis(np.empty(case.shape), case.axis, 1).shape, dtype=tdt, device=dev)
            m = fwd = torch.export.export(m, (example,)).module()
        self.last_module = m

        def np_(t):  # a copy: .numpy() of a float64 CPU tensor shares the module's buffer
            return t.detach().to("cpu", torch.float64).numpy().copy()

        class Layer:
            def train(self, x, dy, mask=None):
                if mask is not None:
                    raise TypeError("renorm.torch takes no mask")
                if not exported:
                    m.train()
                xt = torch.as_tensor(x, device=dev).to(tdt).requires_grad_(True)
                m.zero_grad(set_to_none=True)
                y = fwd(xt)
                y.backward(torch.as_tensor(dy, device=dev).to(tdt))
                return dict(
                    y=np_(y),
                    dx=np_(xt.grad),
                    dgamma=None if m.weight.grad is None else np_(m.weight.grad),
                    dbeta=None if m.bias.grad is None else np_(m.bias.grad),
                    mean=np_(m.running_mean),
                    stddev=np_(m.running_std),
                    step=int(m.num_batches_tracked),
                    r_clipped=float(m.r_clipped),
                    d_clipped=float(m.d_clipped),
                    dtypes={
                        "y": str(y.dtype).removeprefix("torch."),
                        "dx": str(xt.grad.dtype).removeprefix("torch."),
                        "mean": str(m.running_mean.dtype).removeprefix("torch."),
                        "stddev": str(m.running_std.dtype).removeprefix("torch."),
                    },
                )

            def infer(self, x):
                m.eval()
                with torch.no_grad():
                    return np_(fwd(torch.as_tensor(x, device=dev).to(tdt)))

        exported = self.exported
        layer = Layer()
        if exported:
            layer.infer = None
        return layer


# The command's backends: name -> (the module that must import, how to install it, the adapters to run).
BACKENDS = {
    "keras": ("keras", 'pip install "renorm[tf]" (or keras with your backend; KERAS_BACKEND picks it)'),
    "tf": ("tensorflow", 'pip install "renorm[tf]"'),
    "linen": ("flax", 'pip install "renorm[jax]"'),
    "nnx": ("flax", 'pip install "renorm[jax]"'),
    "torch": ("torch", 'pip install "renorm[torch]"'),
}


def adapter_for(backend: str, *, device: str | None = None) -> list[Adapter]:
    """The adapters the command runs for ``backend`` (one of :data:`BACKENDS`).

    >>> [type(a).__name__ for a in adapter_for("torch")]
    ['TorchAdapter', 'TorchAdapter']
    """
    if backend == "keras":
        return [
            KerasAdapter(mode="function", device=device),
            KerasAdapter(mode="eager", explicit_gradient=False, device=device),
        ]
    if backend == "tf":
        return [TFFunctionAdapter(mode="function", device=device)]
    if backend == "linen":
        return [LinenAdapter(device=device), LinenAdapter(device=device, explicit_backward=False)]
    if backend == "nnx":
        return [NNXAdapter(device=device)]
    if backend == "torch":
        return [TorchAdapter(device=device), TorchAdapter(device=device, explicit_backward=False)]
    raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
