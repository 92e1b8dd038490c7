"""The clipping schedule of Batch Renormalization (framework-free).

The limits on the correction factors ``r`` and ``d`` depend on the layer's own
step counter ``t`` (the number of training steps taken before this one)::

    t <  warmup_steps : rmax(t) = 1, dmax(t) = 0            (plain batch norm)
    t >= warmup_steps : rmax(t) = 1 + (rmax - 1) * ramp(t, rmax_steps)
                        dmax(t) =     dmax       * ramp(t, dmax_steps)
    ramp(t, end) = clip((t - warmup_steps) / (end - warmup_steps), 0, 1),
                   and 1 when end <= warmup_steps

The paper (Ioffe, 2017, arXiv:1702.03275, section 4) trains Inception v3 on
ImageNet for about 160k steps with ``rmax`` relaxed from 1 to 3 and ``dmax``
from 0 to 5 after a warm-up of 5k steps, reaching their final values at 40k
and 25k steps. :meth:`ClipSchedule.paper` gives that schedule, scaled to a
run of any length.

:meth:`ClipSchedule.limits` is written with arithmetic and one ``clip``
function only, so that every backend evaluates the *same* expression on its
own tensors (pass ``tf.clip_by_value`` or ``jnp.clip``); nothing here imports
a framework.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from renorm.config import check_schedule

__all__ = ["ClipSchedule", "PAPER_TOTAL_STEPS"]

#: Length of the paper's ImageNet run, the reference for :meth:`ClipSchedule.paper`.
PAPER_TOTAL_STEPS = 160_000


@dataclasses.dataclass(frozen=True)
class ClipSchedule:
    """Limits ``rmax(t)`` and ``dmax(t)`` on the renorm corrections.

    Attributes:
      rmax: final upper limit on ``r`` (its lower limit is ``1 / rmax``); >= 1.
      dmax: final limit on ``|d|``; >= 0.
      warmup_steps: steps of plain batch norm (``rmax = 1, dmax = 0``).
      rmax_steps: step at which ``rmax(t)`` reaches ``rmax``; ``0`` (or any
        value <= ``warmup_steps``) means no ramp: the full value right after
        the warm-up.
      dmax_steps: the same for ``dmax``.

    With the defaults the limits are the constants ``rmax``, ``dmax`` from the
    first step. ``ClipSchedule(rmax=1, dmax=0)`` is exactly batch norm.

    Example (the paper's schedule scaled to an 8000-step run)::

        >>> schedule = ClipSchedule.paper(8000)
        >>> schedule
        ClipSchedule(rmax=3.0, dmax=5.0, warmup_steps=250, rmax_steps=2000, dmax_steps=1250)
        >>> [float(v) for v in schedule.limits(0)], [float(v) for v in schedule.limits(8000)]
        ([1.0, 0.0], [3.0, 5.0])
    """

    rmax: float = 3.0
    dmax: float = 5.0
    warmup_steps: int = 0
    rmax_steps: int = 0
    dmax_steps: int = 0

    def __post_init__(self) -> None:
        check_schedule(
            rmax=self.rmax,
            dmax=self.dmax,
            warmup_steps=self.warmup_steps,
            rmax_steps=self.rmax_steps,
            dmax_steps=self.dmax_steps,
        )
        # Store plain Python numbers whatever was passed (numpy scalars, ...).
        object.__setattr__(self, "rmax", float(self.rmax))
        object.__setattr__(self, "dmax", float(self.dmax))
        for name in ("warmup_steps", "rmax_steps", "dmax_steps"):
            object.__setattr__(self, name, int(getattr(self, name)))

    # ------------------------------------------------------------------ named
    @classmethod
    def paper(cls, total_steps: int | None = None) -> ClipSchedule:
        """The paper's ImageNet schedule, optionally scaled to a shorter run.

        ``warmup_steps=5000``, ``rmax=3`` at ``rmax_steps=40000``, ``dmax=5`` at
        ``dmax_steps=25000``, for a run of :data:`PAPER_TOTAL_STEPS` (160k)
        steps. With ``total_steps`` the breakpoints keep their fraction of the
        run (5000/160000 of ``total_steps`` and so on), rounded to whole steps.
        """
        sched = cls(rmax=3.0, dmax=5.0, warmup_steps=5000, rmax_steps=40000, dmax_steps=25000)
        if total_steps is None:
            return sched
        return sched.scaled(total_steps / PAPER_TOTAL_STEPS)

    @classmethod
    def batch_norm(cls) -> ClipSchedule:
        """``rmax = 1, dmax = 0`` at every step: plain batch norm."""
        return cls(rmax=1.0, dmax=0.0)

    def scaled(self, factor: float) -> ClipSchedule:
        """The same schedule with every breakpoint multiplied by ``factor``.

        Breakpoints are rounded to the nearest step; a ramp that was present
        stays present (its end stays after the warm-up).
        """
        if not factor > 0:
            raise ValueError(f"`factor` must be > 0, got factor={factor!r}.")
        warm = int(round(self.warmup_steps * factor))

        def end(steps: int) -> int:
            if steps <= self.warmup_steps:  # no ramp: keep it that way
                return 0
            return max(int(round(steps * factor)), warm + 1)

        return dataclasses.replace(
            self, warmup_steps=warm, rmax_steps=end(self.rmax_steps), dmax_steps=end(self.dmax_steps)
        )

    # ----------------------------------------------------------------- values
    def _ramp(self, t: Any, end: int, clip: Callable) -> Any:
        w = self.warmup_steps
        if end <= w:
            # A step function: 0 before the warm-up ends, 1 from then on.
            # For integer t, t >= w  <=>  clip(t - w + 1, 0, 1) == 1.
            return clip(t - w + 1.0, 0.0, 1.0)
        # Before the warm-up (t < w) this is already 0.
        return clip((t - w) / float(end - w), 0.0, 1.0)

    def limits(self, t: Any, clip: Callable | None = None) -> tuple[Any, Any]:
        """``(rmax(t), dmax(t))`` for the step counter ``t``.

        ``t`` is a Python number, a NumPy array or any backend's floating
        tensor holding whole numbers; ``clip(value, lo, hi)`` is that backend's
        clip (NumPy's by default). The result has ``t``'s type.
        """
        if clip is None:
            import numpy as np

            clip = np.clip
        rmax_t = 1.0 + (self.rmax - 1.0) * self._ramp(t, self.rmax_steps, clip)
        dmax_t = self.dmax * self._ramp(t, self.dmax_steps, clip)
        return rmax_t, dmax_t

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
