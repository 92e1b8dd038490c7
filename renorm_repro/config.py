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

Presets (:data:`PRESETS`): ``paper``, ``seed``, ``quick``, ``smoke``; see the
comments on each. Overrides (``--key value``) refuse unknown keys and values of
the wrong type (:func:`apply_overrides`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from typing import Dict, Optional, Tuple

from renorm.schedule import ClipSchedule

__all__ = [
    "ConfigError",
    "MicrobatchConfig",
    "EXPERIMENTS",
    "PRESETS",
    "get_config",
    "apply_overrides",
    "parse_override_tokens",
    "config_to_dict",
    "config_from_dict",
    "conv_flops_per_example",
]

OPTIMIZERS = ("adam", "rmsprop")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("default", "mirrored")
DATASETS = ("cifar100", "digits", "synthetic")


class ConfigError(ValueError):
    """A bad preset, override key or value."""


@dataclasses.dataclass(frozen=True)
class MicrobatchConfig:
    """The small-minibatch experiment (paper section 4.2, Figure 2).

    Model: a plain 4-layer convnet (3x3 convolutions of ``width``, ``2*width``,
    ``4*width``, ``8*width`` channels, each followed by the normalization layer
    and a ReLU; 2x2 max pooling after the 2nd and 3rd; global average pooling
    and a linear classifier). Convolutions have no bias (the layer's beta is one).
    """

    experiment: str = "microbatch"
    # --- data
    dataset: str = "cifar100"
    data_dir: Optional[str] = None  # cifar100 only: extracted folder or tarball
    cache_dir: Optional[str] = None  # default: $RENORM_DATA or ~/.cache/renorm_repro
    synthetic_train: int = 512  # synthetic only: examples per split and classes
    synthetic_test: int = 256
    synthetic_classes: int = 10
    # --- arms and seeds
    arms: Tuple[str, ...] = ("bn_micro", "brn_micro", "bn_32")
    seeds: Tuple[int, ...] = (0, 1, 2, 3, 4)
    # --- minibatch structure
    batch_size: int = 1600
    microbatch_size: int = 2  # k
    bn_group: int = 32  # the bn_32 arm's group size
    # --- normalization layer (paper: update rate 0.01, i.e. momentum 0.99)
    momentum: float = 0.99
    epsilon: float = 1e-3
    rmax: float = 3.0  # final limits of the paper's schedule, reached at
    dmax: float = 5.0  # 40k/160k (rmax) and 25k/160k (dmax) of the run
    # --- model and optimization
    width: int = 32
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    steps: int = 8000
    ema_decay: float = 0.0  # 0: evaluate the raw weights; e.g. 0.999: an EMA of the weights
    # --- evaluation, checkpoints
    eval_every: int = 200
    eval_batch_size: int = 1000
    checkpoint_every: int = 1000
    threshold: float = 0.5  # accuracy for "steps to reach" in the summary
    # --- speed
    jit_compile: bool = False
    precision: str = "float32"
    strategy: str = "default"
    deterministic: bool = True

    # ------------------------------------------------------------- checking
    def __post_init__(self):
        def bad(key, why):
            raise ConfigError(f"`{key}` {why}, got {key}={getattr(self, key)!r}.")

        if self.dataset not in DATASETS:
            bad("dataset", f"must be one of {DATASETS}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"must be one of {OPTIMIZERS}")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"must be one of {STRATEGIES}")
        known = tuple(self.arm_specs_template())
        if not self.arms or any(a not in known for a in self.arms) or len(set(self.arms)) != len(self.arms):
            bad("arms", f"must be distinct names among {known}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            bad("seeds", "must be distinct non-negative integers")
        for key in ("batch_size", "microbatch_size", "bn_group", "width", "steps", "eval_every",
                    "eval_batch_size", "checkpoint_every", "synthetic_train", "synthetic_test",
                    "synthetic_classes"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        for key in ("microbatch_size", "bn_group"):
            if self.batch_size % getattr(self, key):
                bad(key, f"must divide batch_size={self.batch_size}")
        if self.jit_compile and self.deterministic:
            bad("jit_compile", "cannot be combined with deterministic=True (XLA has no deterministic max-pooling "
                "gradient); pass --deterministic false with --jit-compile true")
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
        try:
            self.schedule()
        except ValueError as e:
            raise ConfigError(f"rmax={self.rmax!r}, dmax={self.dmax!r}: {e}") from e

    # -------------------------------------------------------------- derived
    def schedule(self) -> ClipSchedule:
        """The paper's schedule scaled to ``steps``, with final limits ``rmax``, ``dmax``."""
        return dataclasses.replace(ClipSchedule.paper(self.steps), rmax=float(self.rmax), dmax=float(self.dmax))

    def arm_specs_template(self) -> Dict[str, str]:
        return {
            "bn_micro": "batch norm on micro-batches of microbatch_size",
            "brn_micro": "Batch Renorm on micro-batches of microbatch_size, paper schedule scaled",
            "bn_32": "batch norm on groups of bn_group",
        }

    def arm_spec(self, arm: str) -> dict:
        """The normalization of ``arm``: ``{"microbatch_size": k, "schedule": ClipSchedule}``."""
        if arm == "bn_micro":
            return {"microbatch_size": self.microbatch_size, "schedule": ClipSchedule.batch_norm()}
        if arm == "brn_micro":
            return {"microbatch_size": self.microbatch_size, "schedule": self.schedule()}
        if arm == "bn_32":
            return {"microbatch_size": self.bn_group, "schedule": ClipSchedule.batch_norm()}
        raise ConfigError(f"Unknown arm={arm!r}; expected one of {tuple(self.arm_specs_template())}.")

    def arm_label(self, arm: str) -> str:
        k, g = self.microbatch_size, self.bn_group
        return {
            "bn_micro": f"Batch Norm, micro-batch {k}",
            "brn_micro": f"Batch Renorm, micro-batch {k}",
            "bn_32": f"Batch Norm, groups of {g}",
        }[arm]

    def train_batch_indices(self, labels, seed: int, step: int):
        """Indices of the training batch at ``step``: i.i.d. shuffled epochs (a pure function of seed, step).

        The hook through which an experiment chooses its minibatch structure (the
        non-i.i.d. experiment of section 4.3 returns ``data.noniid_batch_indices``).
        """
        from renorm_repro.data import batch_indices

        return batch_indices(len(labels), self.batch_size, seed, step)

    def image_shape(self) -> Tuple[int, int, int]:
        return (8, 8, 1) if self.dataset == "digits" else (32, 32, 3)

    def num_classes(self) -> int:
        return {"cifar100": 100, "digits": 10, "synthetic": self.synthetic_classes}[self.dataset]

    def train_size(self) -> int:
        return {"cifar100": 50000, "digits": 1297, "synthetic": self.synthetic_train}[self.dataset]

    def derived(self) -> dict:
        fwd = conv_flops_per_example(self.image_shape(), self.width, self.num_classes())
        return {
            "schedule": self.schedule().to_dict(),
            "arms": {
                arm: {
                    "label": self.arm_label(arm),
                    "microbatch_size": self.arm_spec(arm)["microbatch_size"],
                    "groups_per_batch": self.batch_size // self.arm_spec(arm)["microbatch_size"],
                    "schedule": self.arm_spec(arm)["schedule"].to_dict(),
                }
                for arm in self.arms
            },
            "epochs": self.steps * self.batch_size / self.train_size(),
            "forward_flops_per_example": fwd,
            # A training step is ~3x the forward pass (forward, grad wrt inputs, grad wrt weights).
            "train_flops_per_step": 3 * fwd * self.batch_size,
            "train_flops_per_run": 3 * fwd * self.batch_size * self.steps,
        }


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


EXPERIMENTS = {"microbatch": MicrobatchConfig}

# Presets: overrides of the experiment's defaults. Every one is documented.
PRESETS: Dict[str, dict] = {
    # The paper's minibatch structure at the paper's k = 4: 1600 examples normalized in
    # micro-batches of 4, RMSProp (the paper's optimizer for Inception v3) with an EMA of the
    # weights for evaluation (its practice), on CIFAR-100 with the convnet at width 64.
    # The paper's own model and data (Inception v3, ImageNet, 160k steps on 50 GPUs) are out of scope.
    "paper": dict(dataset="cifar100", microbatch_size=4, batch_size=1600, width=64, optimizer="rmsprop",
                  learning_rate=1e-3, steps=8000, ema_decay=0.999, eval_every=200, checkpoint_every=1000,
                  seeds=(0, 1, 2), threshold=0.4),
    # The published re-implementation's setup, corrected: CIFAR-100, 4-layer convnet, Adam,
    # 1600 examples in micro-batches of 2, 8k steps, 5 seeds, with momentum 0.99 (update rate
    # 0.01), epsilon used, and the paper's rmax=3/dmax=5 schedule scaled to 8k steps.
    "seed": dict(dataset="cifar100", microbatch_size=2, batch_size=1600, width=32, optimizer="adam",
                 learning_rate=1e-3, steps=8000, eval_every=200, checkpoint_every=1000,
                 seeds=(0, 1, 2, 3, 4), threshold=0.4),
    # Real data, offline, minutes on a laptop CPU: scikit-learn's 8x8 digits, 3 seeds.
    "quick": dict(dataset="digits", microbatch_size=2, batch_size=128, bn_group=32, width=8,
                  learning_rate=3e-3, steps=300, eval_every=25, eval_batch_size=500,
                  checkpoint_every=100, seeds=(0, 1, 2), threshold=0.9),
    # Synthetic files in the CIFAR-100 format, seconds: the CI end-to-end check.
    "smoke": dict(dataset="synthetic", synthetic_train=256, synthetic_test=128, synthetic_classes=4,
                  microbatch_size=2, batch_size=64, bn_group=32, width=2, learning_rate=3e-3,
                  steps=12, eval_every=4, eval_batch_size=128, checkpoint_every=4, seeds=(0,),
                  threshold=0.5),
}


# ----------------------------------------------------------------- overrides
def _field_types(cls) -> Dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_bool(key, text):
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"--{key} expects a boolean (true/false), got {text!r}.")


def _parse_value(key: str, typ, value):
    """Convert ``value`` (a string from the command line, or a Python value) to ``typ``."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        inner = next(a for a in args if a is not type(None))
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return _parse_value(key, inner, value)
    if origin in (tuple, Tuple):
        inner = args[0]
        if isinstance(value, str):
            items = [v for v in value.replace(" ", "").split(",") if v != ""]
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


def apply_overrides(cfg, overrides: Dict[str, object]):
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


def parse_override_tokens(tokens) -> Dict[str, str]:
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


def get_config(preset: str, experiment: str = "microbatch", overrides: Optional[Dict[str, object]] = None):
    """The config of ``experiment`` at ``preset``, with ``overrides`` applied."""
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"Unknown experiment={experiment!r}; expected one of {tuple(EXPERIMENTS)}.")
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset={preset!r}; expected one of {tuple(PRESETS)}.")
    cls = EXPERIMENTS[experiment]
    cfg = apply_overrides(cls(), PRESETS[preset])
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
