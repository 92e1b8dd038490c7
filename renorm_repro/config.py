"""Experiment configurations: one frozen dataclass per experiment, named presets, typed overrides.

Every hyperparameter of a run lives in one config object; the values derived
from it (the clipping schedule of each arm, steps per epoch, the FLOP count
of a training step) are computed here, by :meth:`MicrobatchConfig.derived`,
and written next to it in ``config.json``.

Experiments (the registry :data:`EXPERIMENTS`):

``microbatch``  the paper's section 4.2 / Figure 2: minibatches of ``batch_size``
                normalized in micro-batches of ``microbatch_size``. Arms:

                - ``bn_micro``: batch norm (``rmax=1, dmax=0``) on micro-batches of k;
                - ``brn_micro``: Batch Renorm on micro-batches of k, with the paper's
                  schedule scaled to the run (``ClipSchedule.paper(steps)``);
                - ``bn_32``: batch norm on groups of ``bn_group`` (32), the paper's baseline.

``noniid``      section 4.3 / Figure 3: minibatches of ``labels_per_batch`` labels
                drawn with replacement x ``per_label`` images each (16 x 2 = 32).
                Arms: ``bn`` (batch norm on the whole minibatch), ``brn`` (Batch
                Renorm), ``bn_split`` (batch norm applied separately to
                ``split_groups`` parts, each holding one image of every pair), and
                ``bn_iid`` (batch norm on i.i.d. minibatches of the same size: the
                reference the paper compares with). Extra evaluations: inference
                with batch statistics on test minibatches built the same way, and
                training accuracy measured in inference mode.

``iid``         section 4.1 / Figure 1: batch norm vs Batch Renorm on i.i.d.
                minibatches of 32 (arms ``bn``, ``brn``).

Presets (:data:`PRESETS_BY_EXPERIMENT`, :data:`PRESETS` being the ``microbatch``
ones): ``paper``, ``quick``, ``digits``, ``fashion``, ``smoke`` for every experiment (a base each,
:data:`BASE_PRESETS`, and each experiment's changes, :data:`PRESET_CHANGES`), ``seed`` for ``microbatch``;
see the comments on each. Overrides (``--key value``) refuse unknown keys and values of the wrong type
(:func:`apply_overrides`).

Every field is declared with :func:`config_field`: its default, its line of ``--help`` and, where there is a
fixed set, its allowed values. The command line's option (``--key VALUE``, parsed by the field's type), its
help, ``show`` and ``config.json`` all follow from that one declaration.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from types import UnionType

from renorm.schedule import ClipSchedule
from renorm_repro.data import DATASETS

__all__ = [
    "ConfigError",
    "config_field",
    "field_metadata",
    "ExperimentConfig",
    "MicrobatchConfig",
    "NoniidConfig",
    "IidConfig",
    "EXPERIMENTS",
    "PRESETS",
    "PRESETS_BY_EXPERIMENT",
    "preset_names",
    "get_config",
    "apply_overrides",
    "parse_override_tokens",
    "config_to_dict",
    "config_from_dict",
    "conv_flops_per_example",
]

OPTIMIZERS = ("adam", "rmsprop")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("default", "mirrored", "multiworker")
LR_SCHEDULES = ("constant", "cosine", "step")
SCHEDULE_BASES = ("paper_scaled", "paper")
#: Default of ``log_interval`` (:func:`renorm_repro.train.train_run`, ``renorm-repro run --log-interval``): at most
#: one evaluation line a minute a run, besides its last, so that the log of a long job stays readable (Keras's
#: ``verbose=2`` convention: a line per epoch, not per step); ``metrics.csv`` holds every evaluation.
LOG_INTERVAL_S = 60.0


class ConfigError(ValueError):
    """A bad preset, override key or value."""


def config_field(default, help: str, choices=None):
    """A config field: its ``default``, its line of ``--help`` and, for a field with a fixed set of values, the
    ``choices`` (checked by the config, listed by ``--help``). A new field is this one declaration: the command
    line's option, its help and type, ``show`` and ``config.json`` follow from it."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": tuple(choices)}
    return dataclasses.field(default=default, metadata=metadata)


def field_metadata(cls, name: str) -> dict:
    """``{"help", "choices"?}`` of field ``name`` of the config class ``cls``: where it was declared with
    :func:`config_field` (a subclass that only changes a default keeps its base's help)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and "help" in f.metadata:
            return dict(f.metadata)
    return {}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """What every experiment shares: data, seeds, normalization, model, optimization, evaluation, speed.

    Model: a plain 4-layer convnet (3x3 convolutions of ``width``, ``2*width``,
    ``4*width``, ``8*width`` channels, each followed by the normalization layer
    and a ReLU; 2x2 max pooling after the 2nd and 3rd; global average pooling
    and a linear classifier). Convolutions have no bias (the layer's beta is one).

    A subclass names its ``experiment``, its ``arms`` (:meth:`arm_specs_template`,
    :meth:`arm_spec`, :meth:`arm_label`) and its minibatch structure
    (:meth:`train_batch_indices`); it adds its own fields and checks (:meth:`_check`).
    ``ARM_KEYS`` are the fields read only through the arms (:meth:`arm_spec`, :meth:`arm_label`,
    :meth:`title`): two runs that differ only in them train each arm alike if its spec is the same.
    """

    ARM_KEYS = (
        "rmax",
        "dmax",
        "schedule_base",
        "warmup_steps",
        "warmup_time_constants",
        "rmax_steps",
        "dmax_steps",
        "gn_groups",
    )

    experiment: str = ""
    # --- data
    dataset: str = config_field("cifar100", "the data", DATASETS)  # a key of renorm_repro.data.DATASETS
    data_dir: str | None = config_field(
        None, "cifar100: the extracted folder or the tarball; fashion_mnist: the folder of IDX files"
    )
    # Training examples held out as a validation split (stratified, fixed). 0: none, and the
    # val_* columns are measured on the test split (the digits results). > 0: val_* on the
    # validation split, test_* on the test split; presets are chosen on val_* only.
    val_examples: int = config_field(
        0, "training examples held out for validation (0: none; val_* is then the test split)"
    )
    cache_dir: str | None = config_field(
        None, "where downloaded and synthetic data are kept (default $RENORM_DATA or ~/.cache/renorm_repro)"
    )
    synthetic_train: int = config_field(512, "synthetic data only: training examples")
    synthetic_test: int = config_field(256, "synthetic data only: test examples")
    synthetic_classes: int = config_field(10, "synthetic data only: classes")
    # --- arms and seeds
    arms: tuple[str, ...] = config_field((), "the arms to train, comma-separated")  # choices: arm_specs_template
    seeds: tuple[int, ...] = config_field(
        (0, 1, 2, 3, 4), "the seeds (same seed: same initial weights and data order in every arm)"
    )
    # --- minibatch structure
    batch_size: int = config_field(32, "examples per training step")
    # --- normalization layer (paper: update rate 0.01, i.e. momentum 0.99)
    momentum: float = config_field(0.99, "moving-average momentum (the statistics move by 1 - momentum per step)")
    epsilon: float = config_field(1e-3, "added to the variance (inside the moving stddev)")
    # Final limits of the paper's schedule, reached at 40k/160k (rmax) and 25k/160k (dmax) of the run.
    rmax: float = config_field(3.0, "final clipping limit of r (Batch Renorm arms)")
    dmax: float = config_field(5.0, "final clipping limit of d (Batch Renorm arms)")
    # --- clipping schedule of the Batch Renorm arms (:meth:`schedule`). Breakpoints not given come from
    # `schedule_base`: "paper_scaled" (the paper's 5k/40k/25k of 160k steps scaled to `steps`) or "paper"
    # (unscaled). A warm-up given alone moves the ramps with it (their lengths stay the base's).
    schedule_base: str = config_field(
        "paper_scaled", "breakpoints not given: the paper's scaled to steps, or unscaled", SCHEDULE_BASES
    )
    # Steps of plain batch norm, in absolute steps, or in moving-average time constants, 1/(1 - momentum) steps
    # each (not both).
    warmup_steps: int | None = config_field(
        None, "steps of plain batch norm before clipping opens (none: from schedule_base)"
    )
    warmup_time_constants: float | None = config_field(
        None, "the warm-up in 1/(1 - momentum)-step time constants (not with --warmup-steps)"
    )
    rmax_steps: int | None = config_field(None, "step at which rmax is reached (0: no ramp; none: from schedule_base)")
    dmax_steps: int | None = config_field(None, "step at which dmax is reached (0: no ramp; none: from schedule_base)")
    # Groups of the `gn` arm: Keras's own GroupNormalization(groups=gn_groups) in place of every batch-norm
    # layer (each example normalized alone, over groups of channels). Must divide `width` (then every layer's).
    gn_groups: int = config_field(4, "groups of the gn arm's GroupNormalization layers (must divide width)")
    # --- model and optimization
    width: int = config_field(32, "channels of the first convolution (then 2x, 4x, 8x)")
    optimizer: str = config_field("adam", "the optimizer", OPTIMIZERS)
    learning_rate: float = config_field(1e-3, "the (initial) learning rate")
    # Learning-rate schedule over the run: "constant"; "cosine" (half a cosine from
    # learning_rate to 0 at `steps`); "step" (x lr_decay_factor at each fraction lr_decay_at of `steps`).
    lr_schedule: str = config_field(
        "constant", "constant; cosine to 0 at steps; step (x lr_decay_factor at lr_decay_at)", LR_SCHEDULES
    )
    lr_decay_at: tuple[float, ...] = config_field(
        (0.5, 0.75), "step schedule: fractions of the run at which the rate is multiplied"
    )
    lr_decay_factor: float = config_field(0.1, "step schedule: the factor")
    steps: int = config_field(8000, "training steps per run")
    # 0: evaluate the raw weights; e.g. 0.999: an EMA of the weights.
    ema_decay: float = config_field(0.0, "EMA of the weights for evaluation (0: raw weights)")
    # --- evaluation, checkpoints
    eval_every: int = config_field(200, "steps between evaluations (one metrics.csv row each, and the last step)")
    eval_batch_size: int = config_field(1000, "examples per evaluation batch")
    # Training accuracy measured in inference mode on a fixed subset of this many training
    # examples (all of them if the set is smaller); 0 turns it off. Columns train_eval_*.
    eval_train_examples: int = config_field(
        0, "training accuracy in inference mode on this many fixed examples (0: off)"
    )
    # Validation in training mode (batch statistics, moving statistics untouched) on test
    # minibatches built like the training ones (:meth:`eval_batch_indices`). Columns val_batchstat_*.
    eval_batch_stats: bool = config_field(
        False, "also validate with batch statistics on minibatches built like the training ones"
    )
    # How far the moving statistics lag: at each evaluation, every normalization layer's moving
    # mean/stddev against the statistics of its input over this many fixed training examples under
    # the current weights (inference mode upstream); 0 turns it off. Columns lag_mean_norm<i>, lag_std_norm<i>.
    eval_lag_examples: int = config_field(
        0, "log the moving statistics' lag against this many fixed training examples (0: off)"
    )
    # Log r_clipped_mean/d_clipped_mean: the clipped fractions of r and d averaged over every training step
    # since the previous evaluation (r_clipped/d_clipped are those of the last step before it only).
    log_clip_means: bool = config_field(
        False, "log r/d clipped fractions averaged over every step since the previous evaluation"
    )
    # Precise BN (Wu & Johnson 2021): at each evaluation, also evaluate with population statistics recomputed
    # under the current weights over this many fixed i.i.d. training batches of `batch_size`
    # (:meth:`precise_bn_indices`), on a copy of the layers' state (training is untouched); 0 turns it off.
    # Columns val_*_precise, test_*_precise, train_eval_*_precise (NaN for arms without moving statistics).
    precise_bn_batches: int = config_field(
        0,
        "also evaluate with population statistics recomputed on this many fixed i.i.d. training batches "
        "(precise BN; 0: off)",
    )
    checkpoint_every: int = config_field(1000, "steps between checkpoints (and the last step)")
    threshold: float = config_field(0.5, "accuracy for 'steps to reach' in the summary (a fraction)")
    # --- speed
    jit_compile: bool = config_field(False, "XLA-compile the steps (needs --deterministic false)")
    precision: str = config_field("float32", "float32 or mixed precision", PRECISIONS)
    strategy: str = config_field("default", "tf.distribute strategy (multiworker reads TF_CONFIG)", STRATEGIES)
    deterministic: bool = config_field(True, "deterministic TensorFlow ops")
    # The threads of TensorFlow's CPU pools. Deterministic ops give the same bits for the same thread count only:
    # 0 (TensorFlow's default, one per core) makes a CPU run's numbers depend on the machine's cores. The digits
    # presets take 1: their convnet is small enough that one thread is also the fastest, and their committed
    # results then reproduce on any number of cores (of the same instruction set).
    threads: int = config_field(
        0, "TensorFlow's intra- and inter-op CPU threads, set by `renorm-repro run` (0: TensorFlow's default)"
    )

    #: Seed of the test minibatches of the batch-statistics evaluation: the same for every run.
    EVAL_SEED = 1_000_003
    #: Seed of the training batches precise BN recomputes the population statistics on: the same for every run.
    PRECISE_BN_SEED = 3_000_017

    # ------------------------------------------------------------- checking
    def _bad(self, key, why):
        raise ConfigError(f"`{key}` {why}, got {key}={getattr(self, key)!r}.")

    def __post_init__(self):
        bad = self._bad
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                bad(f.name, f"must be one of {choices}")
        if any(not 0.0 < f < 1.0 for f in self.lr_decay_at) or list(self.lr_decay_at) != sorted(self.lr_decay_at):
            bad("lr_decay_at", "must be increasing fractions of the run in (0, 1)")
        if not 0.0 < self.lr_decay_factor <= 1.0:
            bad("lr_decay_factor", "must be in (0, 1]")
        known = tuple(self.arm_specs_template())
        if not self.arms or any(a not in known for a in self.arms) or len(set(self.arms)) != len(self.arms):
            bad("arms", f"must be distinct names among {known}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            bad("seeds", "must be distinct non-negative integers")
        for key in (
            "batch_size",
            "width",
            "steps",
            "eval_every",
            "eval_batch_size",
            "checkpoint_every",
            "synthetic_train",
            "synthetic_test",
            "synthetic_classes",
        ):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        for key in ("val_examples", "eval_lag_examples", "precise_bn_batches", "threads"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0 (0 turns it off)")
        full = DATASETS[self.dataset].resolve(self)["train_size"]
        if self.val_examples >= full:
            bad("val_examples", f"must be smaller than the {full} training examples of {self.dataset}")
        if self.eval_train_examples < 0:
            bad("eval_train_examples", "must be >= 0 (0 turns the inference-mode training accuracy off)")
        if self.jit_compile and self.deterministic:
            bad(
                "jit_compile",
                "cannot be combined with deterministic=True (XLA has no deterministic max-pooling "
                "gradient); pass --deterministic false with --jit-compile true",
            )
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", "must be in [0, 1) (the moving statistics move by 1 - momentum per step)")
        if not self.epsilon > 0:
            bad("epsilon", "must be > 0")
        if not self.learning_rate > 0:
            bad("learning_rate", "must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            bad("ema_decay", "must be in [0, 1) (0 turns the EMA of the weights off)")
        if not 0.0 < self.threshold <= 1.0:
            bad("threshold", "must be an accuracy in (0, 1]")
        if self.gn_groups < 1:
            bad("gn_groups", "must be >= 1")
        if "gn" in self.arms and self.width % self.gn_groups:
            bad(
                "gn_groups",
                f"must divide width={self.width} (the gn arm's layers have width, 2, 4 and 8 x width channels, "
                f"split into gn_groups groups)",
            )
        self._check()
        self._check_schedule()

    def _check_schedule(self):
        bad = self._bad
        if self.warmup_steps is not None and self.warmup_time_constants is not None:
            raise ConfigError(
                "Give the warm-up once: `warmup_steps` or `warmup_time_constants`, got "
                f"warmup_steps={self.warmup_steps!r} and "
                f"warmup_time_constants={self.warmup_time_constants!r}."
            )
        for key in ("warmup_steps", "rmax_steps", "dmax_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.warmup_time_constants is not None and not (
            self.warmup_time_constants >= 0 and math.isfinite(self.warmup_time_constants)
        ):
            bad("warmup_time_constants", "must be a finite number >= 0")
        warm, r_end, d_end = self._breakpoints()
        if warm >= self.steps:
            raise ConfigError(
                f"The warm-up of the Batch Renorm arms ({warm} steps) must be shorter than the run "
                f"(steps={self.steps}): they would be batch norm throughout."
            )
        for key, end in (("rmax_steps", r_end), ("dmax_steps", d_end)):
            given = getattr(self, key) is not None
            if 0 < end <= warm:
                raise ConfigError(
                    f"`{key}` ends the ramp before the warm-up ends (warm-up {warm} steps), got "
                    f"{key}={end!r}{'' if given else ' (moved with the warm-up)'}; "
                    f"pass --{key.replace('_', '-')} 0 for no ramp or a step after {warm}."
                )
            if end > self.steps:
                raise ConfigError(
                    f"`{key}` is after the end of the run (steps={self.steps}), got {key}={end!r}"
                    f"{'' if given else ' (moved with the warm-up)'}: the limit would never "
                    "reach its final value."
                )
        try:
            self.schedule()
        except ValueError as e:
            raise ConfigError(f"rmax={self.rmax!r}, dmax={self.dmax!r}: {e}") from e

    def _check(self):
        """The experiment's own checks (call ``self._bad(key, why)``)."""

    # -------------------------------------------------------------- derived
    def time_constant_steps(self) -> float:
        """The moving averages' time constant, ``1 / (1 - momentum)`` steps (100 at momentum 0.99)."""
        return 1.0 / (1.0 - self.momentum)

    def _breakpoints(self) -> tuple[int, int, int]:
        """``(warmup_steps, rmax_steps, dmax_steps)`` of the Batch Renorm arms (see the fields' comments)."""
        base = ClipSchedule.paper(self.steps) if self.schedule_base == "paper_scaled" else ClipSchedule.paper()
        warm = base.warmup_steps
        if self.warmup_steps is not None:
            warm = self.warmup_steps
        elif self.warmup_time_constants is not None:
            warm = int(round(self.warmup_time_constants * self.time_constant_steps()))

        def end(given, base_end):
            if given is not None:
                return given
            return base_end - base.warmup_steps + warm if base_end > base.warmup_steps else 0

        return warm, end(self.rmax_steps, base.rmax_steps), end(self.dmax_steps, base.dmax_steps)

    def schedule(self) -> ClipSchedule:
        """The Batch Renorm arms' clipping schedule: limits ``rmax``, ``dmax``, breakpoints of :meth:`_breakpoints`.

        By default the paper's schedule scaled to ``steps`` (``ClipSchedule.paper(steps)``).
        """
        warm, r_end, d_end = self._breakpoints()
        return ClipSchedule(
            rmax=float(self.rmax), dmax=float(self.dmax), warmup_steps=warm, rmax_steps=r_end, dmax_steps=d_end
        )

    def learning_rate_at(self, t, cos=math.cos, at_least=lambda a, b: float(a >= b)):
        """The learning rate of training step ``t`` (0-based), one expression for every backend.

        ``cos`` and ``at_least(t, s)`` (1.0 where ``t >= s``, else 0.0) are the
        backend's; Python's by default (the training loop passes TensorFlow's).
        """
        if self.lr_schedule == "cosine":
            frac = t / float(self.steps)
            return self.learning_rate * 0.5 * (1.0 + cos(math.pi * frac))
        if self.lr_schedule == "step":
            lr = self.learning_rate
            for f in self.lr_decay_at:
                lr = lr * (1.0 - (1.0 - self.lr_decay_factor) * at_least(t, float(round(f * self.steps))))
            return lr
        return self.learning_rate + 0.0 * t

    #: Paired comparisons ``(a, b)`` the report makes (``b - a`` per seed), where both arms are run.
    COMPARISONS: typing.ClassVar[tuple[tuple[str, str], ...]] = ()

    def comparisons(self) -> tuple[tuple[str, str], ...]:
        """The pairs of :attr:`COMPARISONS` whose two arms this config runs."""
        return tuple((a, b) for a, b in self.COMPARISONS if a in self.arms and b in self.arms)

    def arm_specs_template(self) -> dict[str, str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def arm_spec(self, arm: str) -> dict:  # pragma: no cover - abstract
        """The normalization of ``arm``: ``{"microbatch_size": k, "schedule": ClipSchedule, "impl": name}``.

        ``impl`` is ``"renorm"`` (this package's layer) or ``"keras"`` (Keras 3's own
        ``BatchNormalization(renorm=True)`` with the same schedule: an independent implementation).
        """
        raise NotImplementedError

    def arm_label(self, arm: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _unknown_arm(self, arm):
        return ConfigError(f"Unknown arm={arm!r}; expected one of {tuple(self.arm_specs_template())}.")

    def train_batch_indices(self, labels, seed: int, step: int, arm: str | None = None):
        """Indices of ``arm``'s training batch at ``step``: i.i.d. shuffled epochs (a pure function of seed, step).

        The hook through which an experiment chooses its minibatch structure (the
        non-i.i.d. experiment of section 4.3 overrides it).
        """
        from renorm_repro.data import batch_indices

        return batch_indices(len(labels), self.batch_size, seed, step)

    def eval_batch_indices(self, labels, index: int, arm: str | None = None):
        """Test minibatch ``index`` of the batch-statistics evaluation: built like ``arm``'s training batches.

        Drawn with the fixed seed :attr:`EVAL_SEED`, so every run sees the same test minibatches.
        """
        return self.train_batch_indices(labels, self.EVAL_SEED, index, arm)

    def eval_batch_count(self, num_test: int) -> int:
        """Test minibatches of the batch-statistics evaluation: as many examples as the test set, rounded up."""
        return -(-num_test // self.batch_size)

    def precise_bn_indices(self, num_train: int) -> list:
        """The ``precise_bn_batches`` training batches precise BN recomputes the population statistics on.

        I.i.d. minibatches of ``batch_size``: the first ``precise_bn_batches`` batches of the shuffled epochs
        of :func:`renorm_repro.data.batch_indices` under the fixed seed :attr:`PRECISE_BN_SEED` (a pure
        function: the same batches at every evaluation, in every run, arm and seed, drawn from no stream
        of the training loop). The estimate pools the batches (mean of E[x], mean of E[x^2]), so only the
        number of examples, ``precise_bn_batches * batch_size``, matters, not how they are cut into batches.
        """
        from renorm_repro.data import batch_indices

        return [
            batch_indices(num_train, self.batch_size, self.PRECISE_BN_SEED, i) for i in range(self.precise_bn_batches)
        ]

    def _gn_spec(self) -> dict:
        """The ``gn`` arm: Keras's GroupNormalization, each example normalized alone (a group of 1 example)."""
        return {
            "microbatch_size": 1,
            "schedule": ClipSchedule.batch_norm(),
            "impl": "group_norm",
            "groups": self.gn_groups,
        }

    def _gn_label(self) -> str:
        return f"Group Norm, {self.gn_groups} groups"

    _GN_TEMPLATE = "Group Normalization (Keras's GroupNormalization, gn_groups groups) in place of every batch norm"

    def title(self) -> str:
        """One line naming the minibatch structure (figure title, summary heading)."""
        return f"minibatch {self.batch_size}"

    def image_shape(self) -> tuple[int, int, int]:
        return tuple(DATASETS[self.dataset].resolve(self)["image_shape"])

    def num_classes(self) -> int:
        return DATASETS[self.dataset].resolve(self)["num_classes"]

    def train_size(self) -> int:
        """Training examples after the validation split."""
        return DATASETS[self.dataset].resolve(self)["train_size"] - self.val_examples

    def derived(self) -> dict:
        fwd = conv_flops_per_example(self.image_shape(), self.width, self.num_classes())
        sched = self.schedule()
        tau = self.time_constant_steps()
        return {
            "schedule": sched.to_dict(),
            # The schedule's breakpoints in moving-average time constants (1/(1 - momentum) steps).
            "schedule_time_constants": {
                "time_constant_steps": round(tau, 6),
                "warmup": round(sched.warmup_steps / tau, 6),
                "rmax_steps": round(sched.rmax_steps / tau, 6),
                "dmax_steps": round(sched.dmax_steps / tau, 6),
            },
            "arms": {
                arm: {
                    "label": self.arm_label(arm),
                    "microbatch_size": self.arm_spec(arm)["microbatch_size"],
                    "groups_per_batch": self.batch_size // self.arm_spec(arm)["microbatch_size"],
                    "schedule": self.arm_spec(arm)["schedule"].to_dict(),
                    "implementation": self.arm_spec(arm).get("impl", "renorm"),
                    **({"groups": self.arm_spec(arm)["groups"]} if "groups" in self.arm_spec(arm) else {}),
                }
                for arm in self.arms
            },
            "epochs": self.steps * self.batch_size / self.train_size(),
            "learning_rate": {
                "start": self.learning_rate_at(0),
                "middle": self.learning_rate_at(self.steps // 2),
                "last_step": self.learning_rate_at(self.steps - 1),
            },
            "forward_flops_per_example": fwd,
            # A training step is ~3x the forward pass (forward, grad wrt inputs, grad wrt weights).
            "train_flops_per_step": 3 * fwd * self.batch_size,
            "train_flops_per_run": 3 * fwd * self.batch_size * self.steps,
        }


@dataclasses.dataclass(frozen=True)
class MicrobatchConfig(ExperimentConfig):
    """The small-minibatch experiment (paper section 4.2, Figure 2)."""

    experiment: str = "microbatch"
    arms: tuple[str, ...] = ("bn_micro", "brn_micro", "bn_32")
    COMPARISONS = (
        ("bn_micro", "brn_micro"),
        ("bn_32", "brn_micro"),
        ("bn_32", "bn_micro"),
        ("bn_micro", "gn"),
        ("brn_micro", "gn"),
        ("bn_32", "gn"),
    )
    ARM_KEYS = ExperimentConfig.ARM_KEYS + ("microbatch_size", "bn_group")
    batch_size: int = 1600
    microbatch_size: int = config_field(2, "k: examples per normalization group of the micro-batch arms")
    bn_group: int = config_field(32, "group size of the bn_32 arm")

    def _check(self):
        for key in ("microbatch_size", "bn_group"):
            if getattr(self, key) < 1:
                self._bad(key, "must be >= 1")
            if self.batch_size % getattr(self, key):
                self._bad(key, f"must divide batch_size={self.batch_size}")

    def arm_specs_template(self) -> dict[str, str]:
        return {
            "bn_micro": "batch norm on micro-batches of microbatch_size",
            "brn_micro": "Batch Renorm on micro-batches of microbatch_size, with the config's clipping schedule "
            "(default: the paper's, scaled)",
            "bn_32": "batch norm on groups of bn_group",
            "gn": self._GN_TEMPLATE,
        }

    def arm_spec(self, arm: str) -> dict:
        if arm == "bn_micro":
            return {"microbatch_size": self.microbatch_size, "schedule": ClipSchedule.batch_norm()}
        if arm == "brn_micro":
            return {"microbatch_size": self.microbatch_size, "schedule": self.schedule()}
        if arm == "bn_32":
            return {"microbatch_size": self.bn_group, "schedule": ClipSchedule.batch_norm()}
        if arm == "gn":
            return self._gn_spec()
        raise self._unknown_arm(arm)

    def arm_label(self, arm: str) -> str:
        k, g = self.microbatch_size, self.bn_group
        return {
            "bn_micro": f"Batch Norm, micro-batch {k}",
            "brn_micro": f"Batch Renorm, micro-batch {k}",
            "bn_32": f"Batch Norm, groups of {g}",
            "gn": self._gn_label(),
        }[arm]

    def title(self) -> str:
        return f"minibatch {self.batch_size}, micro-batches of {self.microbatch_size}"


@dataclasses.dataclass(frozen=True)
class NoniidConfig(ExperimentConfig):
    """Non-i.i.d. minibatches (paper section 4.3, Figure 3).

    Each training minibatch holds ``labels_per_batch`` labels drawn with
    replacement and ``per_label`` distinct images of each
    (:func:`renorm_repro.data.noniid_batch_indices`), so ``batch_size`` must be
    their product (16 x 2 = 32, the paper's). The batch is ordered so that its
    ``split_groups`` consecutive parts each hold ``per_label / split_groups``
    images of every draw (:func:`renorm_repro.data.split_pairs_order`): the
    ``bn_split`` arm normalizes those parts separately, so with 16 x 2 and two
    halves each half holds exactly one image of every pair. The ``bn`` and ``brn``
    arms normalize the whole minibatch, so the order does not change them; all
    three train on the very same batches. ``bn_iid`` trains batch norm on
    i.i.d. minibatches of ``batch_size`` (the reference of the i.i.d. experiment).
    """

    experiment: str = "noniid"
    arms: tuple[str, ...] = ("bn", "brn", "bn_split", "bn_iid")
    COMPARISONS = (
        ("bn", "brn"),
        ("brn", "keras_brn"),
        ("bn", "keras_brn"),
        ("bn_iid", "brn"),
        ("bn_iid", "bn"),
        ("bn", "bn_split"),
        ("bn", "gn"),
        ("brn", "gn"),
        ("bn_iid", "gn"),
    )
    batch_size: int = 32
    eval_train_examples: int = 10000
    eval_batch_stats: bool = True
    labels_per_batch: int = config_field(16, "labels drawn (with replacement) per minibatch")  # L
    per_label: int = config_field(2, "distinct images per drawn label")  # n
    split_groups: int = config_field(2, "parts of the minibatch the bn_split arm normalizes separately")

    def _check(self):
        for key in ("labels_per_batch", "per_label", "split_groups"):
            if getattr(self, key) < 1:
                self._bad(key, "must be >= 1")
        if self.batch_size != self.labels_per_batch * self.per_label:
            self._bad(
                "batch_size",
                f"must equal labels_per_batch x per_label = {self.labels_per_batch} x "
                f"{self.per_label} = {self.labels_per_batch * self.per_label} (pass --batch-size too)",
            )
        if self.per_label % self.split_groups:
            self._bad(
                "split_groups",
                f"must divide per_label={self.per_label} (each part holds the same "
                "number of images of every drawn label)",
            )

    def arm_specs_template(self) -> dict[str, str]:
        return {
            "bn": "batch norm on the whole non-i.i.d. minibatch",
            "brn": "Batch Renorm on the whole non-i.i.d. minibatch, with the config's clipping schedule "
            "(default: the paper's, scaled)",
            "keras_brn": "Keras's own BatchNormalization(renorm=True) configured as the paper, same schedule",
            "bn_split": "batch norm applied separately to split_groups parts, the images of each label split "
            "between them",
            "bn_iid": "batch norm on i.i.d. minibatches of batch_size (reference)",
            "gn": self._GN_TEMPLATE + ", on the non-i.i.d. minibatches",
        }

    def arm_spec(self, arm: str) -> dict:
        if arm in ("bn", "bn_iid"):
            return {"microbatch_size": self.batch_size, "schedule": ClipSchedule.batch_norm()}
        if arm in ("brn", "keras_brn"):
            return {
                "microbatch_size": self.batch_size,
                "schedule": self.schedule(),
                "impl": "keras" if arm == "keras_brn" else "renorm",
            }
        if arm == "bn_split":
            return {"microbatch_size": self.batch_size // self.split_groups, "schedule": ClipSchedule.batch_norm()}
        if arm == "gn":
            return self._gn_spec()
        raise self._unknown_arm(arm)

    def arm_label(self, arm: str) -> str:
        return {
            "bn": "Batch Norm, non-i.i.d.",
            "brn": "Batch Renorm, non-i.i.d.",
            "keras_brn": "Keras renorm, non-i.i.d.",
            "bn_split": f"Batch Norm, non-i.i.d., {self.split_groups} parts of {self.batch_size // self.split_groups}",
            "bn_iid": "Batch Norm, i.i.d. (reference)",
            "gn": self._gn_label() + ", non-i.i.d.",
        }[arm]

    def train_batch_indices(self, labels, seed: int, step: int, arm: str | None = None):
        """``labels_per_batch`` x ``per_label`` minibatches in the split order; i.i.d. ones for ``bn_iid``."""
        from renorm_repro.data import batch_indices, noniid_batch_indices, split_pairs_order

        if arm == "bn_iid":
            return batch_indices(len(labels), self.batch_size, seed, step)
        idx = noniid_batch_indices(
            labels, labels_per_batch=self.labels_per_batch, per_label=self.per_label, seed=seed, step=step
        )
        return split_pairs_order(idx, self.labels_per_batch, self.per_label, self.split_groups)

    def eval_batch_indices(self, labels, index: int, arm: str | None = None):
        """Non-i.i.d. test minibatches (``labels_per_batch`` x ``per_label``, split order) for every arm."""
        return self.train_batch_indices(labels, self.EVAL_SEED, index, arm=None)

    def title(self) -> str:
        return f"non-i.i.d. minibatches of {self.labels_per_batch} labels x {self.per_label} images"


@dataclasses.dataclass(frozen=True)
class IidConfig(ExperimentConfig):
    """The baseline (paper section 4.1, Figure 1): batch norm vs Batch Renorm on i.i.d. minibatches of 32."""

    experiment: str = "iid"
    arms: tuple[str, ...] = ("bn", "brn")
    COMPARISONS = (("bn", "brn"), ("brn", "keras_brn"), ("bn", "keras_brn"), ("bn", "gn"), ("brn", "gn"))
    batch_size: int = 32

    def arm_specs_template(self) -> dict[str, str]:
        return {
            "bn": "batch norm on the whole minibatch",
            "brn": "Batch Renorm on the whole minibatch, with the config's clipping schedule "
            "(default: the paper's, scaled)",
            "keras_brn": "Keras's own BatchNormalization(renorm=True) configured as the paper, same schedule",
            "gn": self._GN_TEMPLATE,
        }

    def arm_spec(self, arm: str) -> dict:
        if arm == "gn":
            return self._gn_spec()
        if arm == "bn":
            return {"microbatch_size": self.batch_size, "schedule": ClipSchedule.batch_norm()}
        if arm in ("brn", "keras_brn"):
            return {
                "microbatch_size": self.batch_size,
                "schedule": self.schedule(),
                "impl": "keras" if arm == "keras_brn" else "renorm",
            }
        raise self._unknown_arm(arm)

    def arm_label(self, arm: str) -> str:
        return {"bn": "Batch Norm", "brn": "Batch Renorm", "keras_brn": "Keras renorm", "gn": self._gn_label()}[arm]

    def title(self) -> str:
        return f"i.i.d. minibatches of {self.batch_size}"


def conv_flops_per_example(image_shape, width: int, num_classes: int) -> int:
    """Multiply-adds x 2 of the convnet's forward pass for one example (convolutions and classifier)."""
    h, w, c = image_shape
    flops = 0
    for i, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        flops += 2 * h * w * 9 * c * out
        c = out
        if i in (1, 2):
            h, w = max(h // 2, 1), max(w // 2, 1)
    return int(flops + 2 * c * num_classes)


EXPERIMENTS = {"microbatch": MicrobatchConfig, "noniid": NoniidConfig, "iid": IidConfig}

# Presets: overrides of the experiment's defaults, as one base per preset (what every experiment shares) and each
# experiment's changes to it (PRESET_CHANGES); PRESETS_BY_EXPERIMENT holds the result. Every one is documented.
BASE_PRESETS: dict[str, dict] = {
    # The paper's practice on CIFAR-100 (its own model and data, Inception v3 on ImageNet for 160k steps on 50
    # GPUs, are out of scope): the convnet at width 64, RMSProp (the paper's optimizer for Inception v3) with an
    # EMA of the weights for evaluation, 40k steps, 3 seeds.
    "paper": dict(
        dataset="cifar100",
        width=64,
        optimizer="rmsprop",
        learning_rate=1e-3,
        steps=40000,
        ema_decay=0.999,
        eval_every=1000,
        eval_batch_size=1000,
        checkpoint_every=5000,
        seeds=(0, 1, 2),
        threshold=0.4,
    ),
    # Real data, offline, minutes on a laptop CPU: scikit-learn's 8x8 digits, 3 seeds, 300 steps.
    "quick": dict(
        dataset="digits",
        threads=1,
        width=8,
        learning_rate=3e-3,
        steps=300,
        eval_every=25,
        eval_batch_size=500,
        checkpoint_every=100,
        seeds=(0, 1, 2),
        threshold=0.9,
    ),
    # The committed digits results (results/*/): the narrow convnet (width 4) so the curves stay apart, 600 steps
    # of 32 (~15 epochs), an evaluation every 20 steps, 5 seeds, training accuracy in inference mode on the whole
    # training set.
    "digits": dict(
        dataset="digits",
        threads=1,
        width=4,
        learning_rate=3e-3,
        steps=600,
        eval_every=20,
        eval_batch_size=500,
        eval_train_examples=2000,
        checkpoint_every=200,
        seeds=(0, 1, 2, 3, 4),
        threshold=0.9,
    ),
    # Fashion-MNIST, the study of results/fashion-mnist: 5000 training images held out for validation (every
    # choice is made on it; the test split is only reported), the convnet at width 16, Adam 3e-3 decayed by a
    # cosine to 0 (the paper decays its rate), the paper's update rate 0.01 (momentum 0.99) and rmax=3/dmax=5
    # schedule scaled to the run, the moving-statistics lag logged on 2000 fixed training images, 5 seeds (same
    # seed = same initial weights and data order in every arm, so arms are compared seed by seed), 4000 steps.
    "fashion": dict(
        dataset="fashion_mnist",
        val_examples=5000,
        width=16,
        optimizer="adam",
        learning_rate=3e-3,
        lr_schedule="cosine",
        eval_batch_size=1000,
        eval_lag_examples=2000,
        seeds=(0, 1, 2, 3, 4),
        threshold=0.85,
        steps=4000,
        eval_every=250,
        checkpoint_every=500,
    ),
    # Synthetic files in the CIFAR-100 format, seconds: the CI end-to-end check.
    "smoke": dict(
        dataset="synthetic",
        synthetic_train=128,
        synthetic_test=64,
        synthetic_classes=4,
        batch_size=8,
        width=2,
        learning_rate=3e-3,
        steps=6,
        eval_every=3,
        eval_batch_size=64,
        checkpoint_every=3,
        seeds=(0,),
        threshold=0.5,
    ),
}

#: Each experiment's changes to :data:`BASE_PRESETS` (a preset only one experiment has is all changes).
PRESET_CHANGES: dict[str, dict[str, dict]] = {
    # The small-minibatch experiment (section 4.2, Figure 2): minibatches normalized in micro-batches of k.
    "microbatch": {
        # The paper's minibatch structure at the paper's k = 4: 1600 examples in micro-batches of 4, 8k steps.
        "paper": dict(microbatch_size=4, batch_size=1600, steps=8000, eval_every=200, checkpoint_every=1000),
        # The published re-implementation's setup, corrected: CIFAR-100, 4-layer convnet, Adam,
        # 1600 examples in micro-batches of 2, 8k steps, 5 seeds, with momentum 0.99 (update rate
        # 0.01), epsilon used, and the paper's rmax=3/dmax=5 schedule scaled to 8k steps.
        "seed": dict(
            dataset="cifar100",
            microbatch_size=2,
            batch_size=1600,
            width=32,
            optimizer="adam",
            learning_rate=1e-3,
            steps=8000,
            eval_every=200,
            checkpoint_every=1000,
            seeds=(0, 1, 2, 3, 4),
            threshold=0.4,
        ),
        "quick": dict(microbatch_size=2, batch_size=128, bn_group=32),
        # The committed results (results/microbatch-k2, -k4; run once with --microbatch-size 4): 400 steps of 128
        # (~40 epochs), an evaluation every 10 steps.
        "digits": dict(microbatch_size=2, batch_size=128, bn_group=32, steps=400, eval_every=10),
        # results/fashion-mnist/microbatch-k2 (and -k4 with --microbatch-size 4): minibatches of 128 normalized in
        # micro-batches of k, 3000 steps (~7 epochs).
        "fashion": dict(microbatch_size=2, batch_size=128, bn_group=32, steps=3000),
        "smoke": dict(
            synthetic_train=256,
            synthetic_test=128,
            microbatch_size=2,
            batch_size=64,
            bn_group=32,
            steps=12,
            eval_every=4,
            eval_batch_size=128,
            checkpoint_every=4,
        ),
    },
    # Non-i.i.d. minibatches (section 4.3, Figure 3): minibatches of 16 labels x 2 images.
    "noniid": {
        # CIFAR-100 (100 classes, so a minibatch of 16 draws holds ~15 distinct labels, as on ImageNet's 1000),
        # 40k steps of 32 (~26 epochs).
        "paper": dict(eval_train_examples=10000),
        "quick": dict(eval_train_examples=2000),
        # The committed results: results/noniid, and results/noniid-4x8 with --labels-per-batch 4 --per-label 8
        # (batch-statistics evaluation on 16 test minibatches of 16 x 2, 512 test images, drawn).
        "digits": {},
        # results/fashion-mnist/noniid: with 10 classes, 16 x 2 would hold ~8 labels per minibatch, close to
        # i.i.d.; 4 labels x 8 images (at most 4 classes per minibatch, 8 images of each) is strongly non-i.i.d.
        # 4000 steps of 32 (~2.3 epochs); Keras's own renorm as a second implementation; the bn_split arm
        # normalizes two halves of 16, each holding 4 images of every drawn label.
        "fashion": dict(
            labels_per_batch=4,
            per_label=8,
            batch_size=32,
            split_groups=2,
            arms=("bn", "brn", "keras_brn", "bn_split", "bn_iid"),
            eval_train_examples=5000,
        ),
        # 4 labels x 2 of 4 classes.
        "smoke": dict(labels_per_batch=4, per_label=2, eval_train_examples=64),
    },
    # The i.i.d. baseline (section 4.1, Figure 1): minibatches of 32.
    "iid": {
        "paper": {},
        "quick": {},
        # The committed results (results/iid): as the noniid digits preset, on i.i.d. minibatches of 32.
        "digits": {},
        # results/fashion-mnist/iid: i.i.d. minibatches of 32, Keras's renorm too.
        "fashion": dict(batch_size=32, arms=("bn", "brn", "keras_brn")),
        "smoke": {},
    },
}

PRESETS_BY_EXPERIMENT: dict[str, dict[str, dict]] = {
    experiment: {name: {**BASE_PRESETS.get(name, {}), **change} for name, change in changes.items()}
    for experiment, changes in PRESET_CHANGES.items()
}
PRESETS = PRESETS_BY_EXPERIMENT["microbatch"]
NONIID_PRESETS = PRESETS_BY_EXPERIMENT["noniid"]
IID_PRESETS = PRESETS_BY_EXPERIMENT["iid"]


def preset_names() -> tuple[str, ...]:
    """Every preset name of any experiment (the CLI's choices; :func:`get_config` checks the pair)."""
    return tuple(sorted({p for presets in PRESETS_BY_EXPERIMENT.values() for p in presets}))


# ----------------------------------------------------------------- overrides
def _field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_bool(key, text):
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"--{key} expects a boolean (true/false), got {text!r}.")


def optional_inner(typ):
    """``X`` of a field annotated ``X | None`` (or ``Optional[X]``), else None."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def _parse_value(key: str, typ, value):
    """Convert ``value`` (a string from the command line, or a Python value) to ``typ``."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    inner = optional_inner(typ)
    if inner is not None:  # X | None
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return _parse_value(key, inner, value)
    if origin is tuple:
        inner = args[0]
        if isinstance(value, str):
            text = value.replace(" ", "")
            items = text.split(",") if text else []
            if "" in items:
                raise ConfigError(f"--{key} expects a comma-separated list without empty items, got {value!r}.")
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"--{key} expects a comma-separated list, got {value!r}.")
        return tuple(_parse_value(key, inner, v) for v in items)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(key, value)
        raise ConfigError(f"--{key} expects a boolean, got {value!r}.")
    if typ is int:
        if isinstance(value, bool) or (not isinstance(value, (int, str))):
            raise ConfigError(f"--{key} expects an integer, got {value!r}.")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"--{key} expects an integer, got {value!r}.") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"--{key} expects a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key} expects a number, got {value!r}.") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"--{key} expects a string, got {value!r}.")
        return value
    raise ConfigError(f"--{key}: unsupported field type {typ!r}.")  # pragma: no cover


def apply_overrides(cfg, overrides: dict[str, object]):
    """A copy of ``cfg`` with ``overrides`` (``{key: value}``, values strings or Python values).

    Unknown keys (with a suggestion) and values of the wrong type raise
    :class:`ConfigError`; so do values the config's own checks reject.
    """
    types = _field_types(type(cfg))
    changes = {}
    for raw_key, value in overrides.items():
        key = raw_key.replace("-", "_")
        if key not in types or key == "experiment":
            close = difflib.get_close_matches(key, list(types), n=3)
            hint = f" Did you mean {', '.join('--' + c.replace('_', '-') for c in close)}?" if close else ""
            raise ConfigError(
                f"Unknown config key --{raw_key} for experiment {cfg.experiment!r}.{hint} "
                f"Known keys: {', '.join(sorted(k for k in types if k != 'experiment'))}."
            )
        changes[key] = _parse_value(raw_key, types[key], value)
    return dataclasses.replace(cfg, **changes)


def parse_override_tokens(tokens) -> dict[str, str]:
    """``["--steps", "10", "--arms=bn_micro"]`` -> ``{"steps": "10", "arms": "bn_micro"}``."""
    out = {}
    i = 0
    tokens = list(tokens)
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"Expected an override --key value, got {tok!r}.")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            i += 1
        else:
            key = tok[2:]
            if i + 1 >= len(tokens) or (tokens[i + 1].startswith("--") and not _is_number(tokens[i + 1])):
                raise ConfigError(f"Override --{key} has no value; write --{key} VALUE.")
            value = tokens[i + 1]
            i += 2
        if key.replace("-", "_") in {k.replace("-", "_") for k in out}:
            raise ConfigError(f"Override --{key} is given twice.")
        out[key] = value
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def get_config(preset: str, experiment: str = "microbatch", overrides: dict[str, object] | None = None):
    """The config of ``experiment`` at ``preset``, with ``overrides`` applied."""
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"Unknown experiment={experiment!r}; expected one of {tuple(EXPERIMENTS)}.")
    presets = PRESETS_BY_EXPERIMENT[experiment]
    if preset not in presets:
        raise ConfigError(f"Unknown preset={preset!r} for experiment={experiment!r}; expected one of {tuple(presets)}.")
    cls = EXPERIMENTS[experiment]
    cfg = apply_overrides(cls(), presets[preset])
    return apply_overrides(cfg, overrides or {})


def config_to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_dict(d: dict):
    """Rebuild a config from :func:`config_to_dict`'s output (as read from ``config.json``)."""
    experiment = d.get("experiment")
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"config.json names unknown experiment={experiment!r}.")
    cls = EXPERIMENTS[experiment]
    return apply_overrides(cls(), {k: v for k, v in d.items() if k != "experiment"})


def dumps(cfg) -> str:
    return json.dumps({"config": config_to_dict(cfg), "derived": cfg.derived()}, indent=2, sort_keys=True)
