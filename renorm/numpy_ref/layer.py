"""A small stateful wrapper around the oracle, for comparing ports over many steps."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from renorm.config import check_config, check_num_features
from renorm.numpy_ref.core import check_statistics, inference_forward, train_backward, train_forward
from renorm.schedule import ClipSchedule

__all__ = ["BatchRenormReference"]


class BatchRenormReference:
    """The oracle as a layer: parameters, moving statistics, step counter, schedule.

    ``train(x)`` runs one training step at the limits ``schedule.limits(step)``,
    updates ``mean``, ``stddev`` and ``step`` (all unchanged by an empty batch)
    and keeps what ``backward(dy)`` needs; ``infer(x)`` uses the moving statistics only. Every argument is
    explicit (the ports' defaults differ: Keras ``epsilon=1e-3``, Flax
    ``1e-5``). The state starts at ``mean = 0``, ``stddev = 1``, ``step = 0``
    unless given; ``gamma``/``beta`` start at 1/0 and are ``None`` when
    ``scale``/``center`` is off.

    Attributes after a training step: ``last`` (the :class:`TrainResult`),
    ``r_clipped`` and ``d_clipped`` (fractions changed by the clip).

    Example::

        >>> import numpy as np
        >>> layer = BatchRenormReference(4, momentum=0.99, epsilon=1e-3, microbatch_size=2)
        >>> x = np.random.default_rng(0).normal(size=(8, 4))
        >>> y = layer.train(x)                               # one step: mean, stddev, step updated
        >>> dx, dgamma, dbeta = layer.backward(np.ones_like(y))   # the paper's explicit backward
        >>> layer.step, y.shape, layer.infer(x).shape        # inference: the moving statistics only
        (1, (8, 4), (8, 4))

    The rules are those of the specification (``docs/SPEC.md``); the guide's
    page on the algorithm and the oracle shows it in use.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float,
        epsilon: float,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        rmax_steps: int = 0,
        dmax_steps: int = 0,
        axis: int = -1,
        microbatch_size: int | None = None,
        center: bool = True,
        scale: bool = True,
        dtype: DTypeLike = np.float64,
        gamma: ArrayLike | None = None,
        beta: ArrayLike | None = None,
        mean: ArrayLike | None = None,
        stddev: ArrayLike | None = None,
        step: int = 0,
    ) -> None:
        check_config(momentum=momentum, epsilon=epsilon, microbatch_size=microbatch_size)
        num_features = check_num_features(num_features)
        self.schedule = ClipSchedule(rmax, dmax, warmup_steps, rmax_steps, dmax_steps)
        self.momentum = momentum
        self.epsilon = epsilon
        self.axis = axis
        self.microbatch_size = microbatch_size
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise TypeError(f"dtype={self.dtype.name!r}: the state needs a floating dtype (float32 or float64)")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step={step!r}: expected an integer >= 0 (the training steps taken)")
        c = num_features

        def init(value: ArrayLike | None, default: float) -> np.ndarray:
            return np.full(c, default, self.dtype) if value is None else np.array(value, self.dtype)

        check_statistics(
            gamma if scale else None, beta if center else None, init(mean, 0.0), init(stddev, 1.0), c
        )  # before reshaping: a wrong length or rank fails here, in one line
        self.gamma = init(gamma, 1.0) if scale else None
        self.beta = init(beta, 0.0) if center else None
        self.mean = init(mean, 0.0)
        self.stddev = init(stddev, 1.0)
        self.step = int(step)
        self.last = None
        self.r_clipped = self.d_clipped = 0.0

    def limits(self) -> tuple[float, float]:
        """``(rmax, dmax)`` for the next training step."""
        rmax, dmax = self.schedule.limits(float(self.step))
        return float(rmax), float(dmax)

    def train(self, x: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
        """One training step; returns ``y``.

        ``mask``: optional, broadcastable to ``x`` (see :func:`train_forward`).
        A batch of 0 examples, or a mask that selects no value, is no step:
        the output is computed (empty, or the inference output) and the state
        (``mean``, ``stddev``, ``step``) and the diagnostics stay as they were.
        """
        rmax, dmax = self.limits()
        res = train_forward(
            x,
            self.gamma,
            self.beta,
            self.mean,
            self.stddev,
            rmax=rmax,
            dmax=dmax,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=self.axis,
            microbatch_size=self.microbatch_size,
            mask=mask,
        )
        self.last = res
        if res.count.sum() == 0:  # no value entered a statistic
            return res.y
        self.mean, self.stddev = res.mean, res.stddev
        self.step += 1
        self.r_clipped, self.d_clipped = res.r_clipped, res.d_clipped
        return res.y

    def backward(self, dy: ArrayLike) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Gradients of the last training step: ``(dx, dgamma, dbeta)``.

        ``dgamma``/``dbeta`` are ``None`` when ``scale``/``center`` is off.
        """
        if self.last is None:
            raise RuntimeError("backward() needs a training step first: call train(x).")
        dx, dgamma, dbeta = train_backward(dy, self.last.cache)
        return dx, (None if self.gamma is None else dgamma), (None if self.beta is None else dbeta)

    def infer(self, x: ArrayLike) -> np.ndarray:
        """Inference with the moving statistics; returns ``y``."""
        return inference_forward(x, self.gamma, self.beta, self.mean, self.stddev, axis=self.axis)

    @property
    def state(self) -> dict:
        return {"mean": self.mean.copy(), "stddev": self.stddev.copy(), "step": self.step}
