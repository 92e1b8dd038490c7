"""The model and the training loop, in TensorFlow with :class:`renorm.tf.BatchRenormalization`.

One call of :func:`train_run` trains one (arm, seed) into its own run directory:

- data: ``uint8`` arrays in memory; the batch of step ``t`` is
  ``cfg.train_batch_indices(labels, seed, t)`` (by default :func:`renorm_repro.data.batch_indices`,
  a pure function, so a resumed run sees the same batches), gathered in NumPy step by step (``tf.data``
  with prefetch under the ``mirrored`` and ``multiworker`` strategies); the
  conversion to float and the per-channel normalization run on the device,
  inside the compiled step;
- the step is a ``tf.function`` (``jit_compile`` optional), under a
  ``tf.distribute`` strategy (``mirrored`` splits each batch into consecutive
  per-replica slices; each replica normalizes its own micro-batches;
  ``multiworker`` does the same over the workers of ``TF_CONFIG``, worker ``w``
  feeding the slices of its own replicas);
- Adam (default) or RMSProp; optional EMA of the trainable weights, used for
  evaluation; optional mixed precision (``mixed_float16`` with loss scaling, or
  ``mixed_bfloat16``);
- every ``eval_every`` steps: validation loss/accuracy in inference mode and,
  when the config asks for them, training loss/accuracy in inference mode on a
  fixed subset of the training set (``eval_train_examples``) and validation
  with batch statistics on test minibatches built like the training ones
  (``eval_batch_stats``: the layers run in training mode, and every moving
  statistic, step counter and diagnostic is restored afterwards, so training
  is unaffected); one row in ``metrics.csv``, the same scalars and each
  normalization layer's clip fractions and limits in TensorBoard event files
  (``tensorboard/``), one log line; every ``checkpoint_every`` steps a
  ``tf.train.CheckpointManager`` checkpoint of the model, optimizer, step, EMA
  and the running training metrics (the data order needs only the step), saved
  after that step's log row and events are on disk.

Resuming (``resume=True``) restores the newest intact checkpoint: each
candidate is read in full (every tensor's checksum) before it is used; a
damaged one is reported and the next older one tried; a save that a crash cut
short (a checkpoint the state file does not name yet) is skipped. The log is
then reconciled with the checkpoint (:meth:`renorm_repro.runs.MetricsLog.start`,
:meth:`renorm_repro.tensorboard_log.EventLog.start`).
So a run killed at any point and resumed ends with the log of an uninterrupted
run (every column but ``elapsed_s``). Under ``multiworker`` the workers first
agree on the newest checkpoint every one of them holds
(:func:`_agree_on_checkpoint`; a worker killed during a save may lack the
newest one, or the others may have finished the run), restore it, drop newer
ones and reconcile their logs with it; a run is skipped only when complete on
every worker.

:func:`train_run` reads as its steps: :func:`_prepare_run_dir` (the folder and
``done.json``), :func:`_build_state` (model, optimizer and every checkpointed
variable, a :class:`_RunState`), :func:`_agree_across_workers` and
:func:`_restore` (checkpoints and resume), :func:`_start_logs` and
:func:`_write_run_record`, :func:`_input_pipeline`, :func:`_train_step` (the
compiled step, :func:`_replica_step` on each replica), :class:`_Evaluator`
(every evaluation), :func:`_train_loop` (evaluate, log, checkpoint, stop) and
:func:`_finish` (``done.json``).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from renorm_repro import interrupts
from renorm_repro.config import LOG_INTERVAL_S
from renorm_repro.data import Dataset
from renorm_repro.runs import (
    Interrupted,
    MetricsLog,
    RunDirError,
    _write_atomic,
    _write_json,
    config_to_dict,
    evaluation_steps,
    metric_columns,
    read_metrics,
    record_versions,
)
from renorm_repro.tensorboard_log import TENSORBOARD_DIR, EventLog, layer_scalars

__all__ = ["make_norm_layer", "build_model", "train_run", "train_eval_subset", "TrainResult"]

_MULTIWORKER = []  # the process's one MultiWorkerMirroredStrategy: it can be created only once


def _strategy(name: str):
    """The ``tf.distribute`` strategy of ``cfg.strategy``."""
    import os

    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if not _MULTIWORKER:
            if not os.environ.get("TF_CONFIG"):
                raise RunDirError(
                    "strategy=multiworker reads the cluster from the TF_CONFIG environment variable, "
                    "which is not set (see docs/distributed.md, 'Keras / TensorFlow', 'On a cluster')."
                )
            _MULTIWORKER.append(tf.distribute.MultiWorkerMirroredStrategy())
        return _MULTIWORKER[0]
    return tf.distribute.get_strategy()


def train_eval_subset(num_train: int, size: int, seed: int = 1_000_003) -> np.ndarray:
    """The fixed training examples of the inference-mode training accuracy: all, or ``size`` of them (sorted)."""
    if size >= num_train:
        return np.arange(num_train)
    return np.sort(np.random.default_rng(seed).choice(num_train, size=size, replace=False))


def make_norm_layer(cfg, arm: str, name: str | None = None):
    """The normalization layer of ``arm``: ``renorm.tf.BatchRenormalization`` for every arm but ``keras_brn``.

    Batch-norm arms are the same layer with ``rmax=1, dmax=0`` (exactly batch
    norm, docs/SPEC.md), so the arms differ only in the clipping limits and
    the group size. Arms whose spec has ``impl == "keras"`` use Keras 3's own
    ``BatchNormalization(renorm=True)`` with the same schedule
    (:class:`renorm_repro.keras_renorm.ScheduledKerasRenorm`). The ``gn`` arm (``impl == "group_norm"``) uses
    Keras's ``GroupNormalization(groups=cfg.gn_groups)``: no moving statistics, no clip diagnostics.
    """
    spec = cfg.arm_spec(arm)
    s = spec["schedule"]
    if spec.get("impl") == "group_norm":  # the gn arm: Keras's own layer, no batch statistics at all
        import keras

        return keras.layers.GroupNormalization(groups=spec["groups"], epsilon=cfg.epsilon, name=name)
    if spec.get("impl", "renorm") == "keras":
        from renorm_repro.keras_renorm import ScheduledKerasRenorm

        if spec["microbatch_size"] != cfg.batch_size:
            raise ValueError(
                f"arm {arm!r}: Keras's renorm normalizes whole minibatches only, got "
                f"microbatch_size={spec['microbatch_size']} for batch_size={cfg.batch_size}."
            )
        return ScheduledKerasRenorm(s, momentum=cfg.momentum, epsilon=cfg.epsilon, name=name)
    from renorm.tf import BatchRenormalization

    return BatchRenormalization(
        momentum=cfg.momentum,
        epsilon=cfg.epsilon,
        rmax=s.rmax,
        dmax=s.dmax,
        warmup_steps=s.warmup_steps,
        rmax_steps=s.rmax_steps,
        dmax_steps=s.dmax_steps,
        microbatch_size=spec["microbatch_size"],
        name=name,
    )


def build_model(image_shape, num_classes: int, width: int, norm: Callable):
    """The plain 4-layer convnet; ``norm(name=...)`` makes each normalization layer."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=tuple(image_shape), name="image")
    x = inputs
    for i, ch in enumerate((width, 2 * width, 4 * width, 8 * width)):
        x = layers.Conv2D(ch, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = norm(name=f"norm{i + 1}")(x)
        x = layers.ReLU(name=f"relu{i + 1}")(x)
        if i in (1, 2):
            x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name="classifier")(x)
    return keras.Model(inputs, outputs, name="convnet")


class TrainResult(dict):
    """``{"final_step", "stopped", "rows"}`` of a :func:`train_run` call."""


def _learning_rate(cfg):
    """A float (constant) or a Keras schedule evaluating :meth:`ExperimentConfig.learning_rate_at` in TF."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    import keras
    import tensorflow as tf

    class _ConfigSchedule(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            t = tf.cast(step, tf.float32)
            return cfg.learning_rate_at(t, cos=tf.cos, at_least=lambda a, b: tf.cast(a >= b, tf.float32))

        def get_config(self):
            return {}

    return _ConfigSchedule()


def _optimizer(cfg):
    import keras

    lr = _learning_rate(cfg)
    if cfg.optimizer == "adam":
        opt = keras.optimizers.Adam(learning_rate=lr)
    else:
        opt = keras.optimizers.RMSprop(learning_rate=lr, rho=0.9, momentum=0.9)
    if cfg.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


_CKPT_FILE = re.compile(r"ckpt-(\d+)\.(?:index|data-\d+-of-\d+)")
_STATE_PATH = re.compile(r'(model_checkpoint_path|all_model_checkpoint_paths):\s*"([^"]*)"')
_STATE_NUMBER = re.compile(r"(all_model_checkpoint_timestamps|last_preserved_timestamp):\s*[-+0-9.eE]+")


def _read_checkpoint_state(path: Path) -> tuple[list[int] | None, str | None]:
    """Numbers of the checkpoints that the state file ``path`` names, and why it cannot be read.

    ``([], None)`` when there is no state file (no save has finished yet);
    ``(None, why)`` when it is damaged. Read here rather than by TensorFlow,
    which ignores a garbled file with a warning and fails on an empty one.
    """
    if not path.exists():
        return [], None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return None, repr(e)
    numbers, latest = [], False
    for line in text.splitlines():
        line = line.strip()
        m = _STATE_PATH.fullmatch(line)
        if m:
            name = m.group(2).replace("\\", "/").rsplit("/", 1)[-1]
            num = re.fullmatch(r"ckpt-(\d+)", name)
            if num is None:
                return None, f"it names {m.group(2)!r}, not a checkpoint of this run"
            numbers.append(int(num.group(1)))
            latest |= m.group(1) == "model_checkpoint_path"
        elif line and not _STATE_NUMBER.fullmatch(line):
            return None, f"unexpected line {line[:60]!r}"
    if not latest:
        return None, "it names no latest checkpoint" if text.strip() else "it is empty"
    return numbers, None


def _checkpoint_problem(prefix: Path) -> str | None:
    """Why the checkpoint ``prefix`` cannot be restored (a missing file, a truncated or corrupt one), or None.

    Reads every tensor: TensorFlow checks each one's length and CRC32C as it reads it.
    """
    import tensorflow as tf

    index = prefix.with_name(prefix.name + ".index")
    if not index.is_file():
        return f"{index.name} is missing"
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        for name in reader.get_variable_to_dtype_map():
            reader.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - any failure to read it means it is not intact
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:200]}"
    return None


def _scan_checkpoints(ckpt_dir: Path, label: str, log, at_most: int | None = None, problems=None):
    """The newest intact checkpoint number ``<= at_most`` in ``ckpt_dir`` (or None), and what was found on the way.

    Returns ``(chosen, damaged, state_problem, on_disk)``: ``damaged`` lists the
    committed checkpoints that cannot be read (``"path (why)"``), newest first.
    ``problems`` caches :func:`_checkpoint_problem` per number across calls.
    Removes the shards of saves that a crash cut short and logs each skipped
    unfinished save (unless ``log`` is None).
    """
    problems = {} if problems is None else problems
    state_path = ckpt_dir / "checkpoint"
    committed, state_problem = _read_checkpoint_state(state_path)
    on_disk = (
        {int(m.group(1)) for f in ckpt_dir.iterdir() if (m := _CKPT_FILE.fullmatch(f.name))}
        if ckpt_dir.is_dir()
        else set()
    )
    for leftover in ckpt_dir.glob("ckpt-*_temp") if ckpt_dir.is_dir() else ():
        if leftover.is_dir() and re.fullmatch(r"ckpt-\d+_temp", leftover.name):
            shutil.rmtree(leftover)  # the shards of a save that a crash cut short (no one else writes here)
    damaged, chosen = [], None
    for n in sorted(on_disk | set(committed or ()), reverse=True):
        if at_most is not None and n > at_most:
            continue
        if n not in problems:
            problems[n] = _checkpoint_problem(ckpt_dir / f"ckpt-{n}")
        problem = problems[n]
        if problem is None:
            chosen = n
            break
        if committed is not None and n not in committed:  # the save of ckpt-n did not finish (a crash)
            if log is not None:
                log(f"{label} skipping ckpt-{n}, a save that did not finish ({problem})")
        else:
            damaged.append(f"{ckpt_dir / f'ckpt-{n}'} ({problem})")
    return chosen, damaged, state_problem, on_disk


def _no_intact_checkpoint(ckpt_dir: Path, damaged, state_problem, on_disk) -> str | None:
    """Why the run cannot go on when no checkpoint is intact (files exist, none readable), or None."""
    if damaged or (state_problem and on_disk):
        state_path = ckpt_dir / "checkpoint"
        return (
            f"no intact checkpoint in {ckpt_dir}: "
            + "; ".join(damaged or [f"state file {state_path} ({state_problem})"])
            + f". Restore the files, or delete {ckpt_dir.parent} to train this run again from step 0."
        )
    return None


def _restore_newest_intact(
    ckpt, ckpt_dir: Path, label: str, log, at_most: int | None = None, newer_why: str | None = None
) -> int | None:
    """Restore the newest intact checkpoint in ``ckpt_dir`` into ``ckpt``; its number, or None if there is none.

    Raises :class:`RunDirError` when checkpoint files exist but none can be
    restored (the run would otherwise silently start over). Leaves a state
    file naming the restored checkpoint and the older ones, for the
    ``CheckpointManager`` to read. ``at_most``: restore the newest intact
    checkpoint at or before that step (the step every worker of a
    ``multiworker`` run can restore, :func:`_agree_on_checkpoint`) and delete
    the newer ones, so that a later resume cannot pick them up.
    """
    state_path = ckpt_dir / "checkpoint"
    chosen, damaged, state_problem, on_disk = _scan_checkpoints(ckpt_dir, label, log, at_most)
    if state_problem:
        log(
            f"{label} the checkpoint state file {state_path} is damaged ({state_problem}); "
            f"looking for checkpoints by name"
        )
    newer = sorted(n for n in on_disk if at_most is not None and n > at_most)
    if newer:
        log(
            f"{label} dropping {', '.join(f'ckpt-{n}' for n in newer)}: "
            + (newer_why or "newer than the checkpoint every worker holds")
        )
    if chosen is None:
        why = _no_intact_checkpoint(ckpt_dir, damaged, state_problem, on_disk - set(newer))
        if why:
            raise RunDirError(why)
        if state_path.exists():
            state_path.unlink()  # it names nothing that exists, or only checkpoints the other workers lack
        _remove_checkpoints(ckpt_dir, newer)
        return None
    prefix = ckpt_dir / f"ckpt-{chosen}"
    if damaged:
        log(
            f"{label} damaged checkpoint {damaged[0]}"
            + (f" and {len(damaged) - 1} more" if len(damaged) > 1 else "")
            + f"; resuming from the older {prefix}"
        )
    try:
        ckpt.restore(str(prefix)).assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001 - intact, but not this run's model
        first = (str(e).strip().splitlines() or [""])[0]
        raise RunDirError(
            f"checkpoint {prefix} does not fit this run's model ({type(e).__name__}: {first[:200]}); "
            f"was the folder written with another config?"
        ) from None
    kept = sorted(n for n in on_disk if n <= chosen and (ckpt_dir / f"ckpt-{n}.index").is_file())
    _write_atomic(
        state_path,
        (
            f'model_checkpoint_path: "ckpt-{chosen}"\n'
            + "".join(f'all_model_checkpoint_paths: "ckpt-{n}"\n' for n in kept)
        ).encode(),
    )
    _remove_checkpoints(ckpt_dir, newer)  # after the state file stopped naming them
    return chosen


def _remove_checkpoints(ckpt_dir: Path, numbers) -> None:
    for n in numbers:
        for f in ckpt_dir.glob(f"ckpt-{n}.*"):
            if _CKPT_FILE.fullmatch(f.name):
                f.unlink()


def _gather_from_workers(strategy, values) -> np.ndarray:
    """``values`` (floats) of every replica of every worker: one row per replica, in replica order.

    One SUM all-reduce of a one-hot matrix, the only reduction every
    collective implementation has; each worker's replicas report the same row.
    """
    import tensorflow as tf

    n = strategy.num_replicas_in_sync
    local = tf.constant(np.asarray(values, np.float64)[None, :])

    def replica_fn():
        ctx = tf.distribute.get_replica_context()
        onehot = tf.one_hot(ctx.replica_id_in_sync_group, n, dtype=tf.float64)[:, None]
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, onehot * local)

    result = tf.function(lambda: strategy.run(replica_fn))()
    return strategy.experimental_local_results(result)[0].numpy()


def _agree_on_checkpoint(strategy, ckpt_dir: Path, *, resume: bool, done: bool, label: str, log):
    """The checkpoint every worker of a ``multiworker`` run restores: ``(step or None, every worker done)``.

    Workers die at different moments (one may have saved step N, or finished
    the run, while another was killed during that save), so each would
    resume from a different step and the collectives would mismatch or hang.
    Each worker reports its newest intact checkpoint; all take the minimum
    ``c``; each reports its newest intact one at or before ``c``; and so on
    until every worker has ``c`` itself (the newest checkpoint all of them
    hold; older ones are kept, ``max_to_keep=2``, for this). ``None``: some
    worker has none, so all start again from step 0. A worker whose
    checkpoint files are all damaged makes every worker stop with
    :class:`RunDirError`, before anything is changed.
    """
    problems = {}
    bound = None
    local, why = 0, None
    if resume:
        chosen, damaged, state_problem, on_disk = _scan_checkpoints(ckpt_dir, label, None, None, problems)
        local = chosen or 0
        why = None if chosen else _no_intact_checkpoint(ckpt_dir, damaged, state_problem, on_disk)
    task = getattr(strategy.cluster_resolver, "task_id", 0) or 0
    rows = _gather_from_workers(strategy, [local, float(done), float(why is not None), task])
    if rows[:, 2].any():
        if why:
            raise RunDirError(why)
        bad = ", ".join(str(int(t)) for t in sorted(set(rows[rows[:, 2] > 0, 3])))
        raise RunDirError(
            f"worker {bad} has checkpoint files of {ckpt_dir.parent.relative_to(ckpt_dir.parents[3])} "
            f"but none intact (its output names them), so the workers cannot resume together. "
            f"Nothing was changed here."
        )
    if rows[:, 1].all():
        return None, True
    while True:
        bound = int(rows[:, 0].min())
        if (rows[:, 0] == bound).all() or bound == 0:
            return (bound or None), False
        chosen = _scan_checkpoints(ckpt_dir, label, None, bound, problems)[0] if resume else None
        rows = _gather_from_workers(strategy, [chosen or 0])


def _done_step(done: Path) -> int | None:
    """The ``final_step`` of a ``done.json``, or None when it cannot be read."""
    try:
        final = json.loads(done.read_text()).get("final_step")
    except (OSError, ValueError, AttributeError):
        return None
    return final if isinstance(final, int) else None


class _RunCall:
    """What one :func:`train_run` call was asked: the run, its folder and the call's options."""

    def __init__(self, cfg, arm, seed, rdir, dataset, *, resume, stop_after, progress, tensorboard, log, log_interval):
        self.cfg, self.arm, self.seed, self.rdir, self.dataset = cfg, arm, seed, Path(rdir), dataset
        self.resume, self.stop_after, self.progress, self.tensorboard = resume, stop_after, progress, tensorboard
        self.log, self.log_interval = log, log_interval
        self.label = f"[{arm} seed{seed}]"
        self.done = self.rdir / "done.json"
        self.ckpt_dir = self.rdir / "checkpoints"


class _RunState:
    """The model and every variable a checkpoint holds, built under the strategy's scope (:func:`_build_state`)."""

    def __init__(self, cfg, model, optimizer, step, acc_vars, ema, mean, std):
        import tensorflow as tf

        self.model, self.optimizer, self.step, self.ema = model, optimizer, step, ema
        self.acc_vars = acc_vars  # the running training metrics since the previous evaluation
        self.loss_sum, self.correct_sum, self.count_sum = acc_vars[:3]
        self.clip_sums = (
            {"r_clip_sum": acc_vars[3], "d_clip_sum": acc_vars[4], "clip_steps": acc_vars[5]}
            if cfg.log_clip_means
            else {}
        )
        self.norm_layers = [layer for layer in model.layers if layer.name.startswith("norm")]
        # The layers with clip diagnostics: every one but the gn arm's.
        self.clip_layers = [layer for layer in self.norm_layers if hasattr(layer, "r_clipped_fraction")]
        self.mean, self.std = mean, std
        self.ckpt = tf.train.Checkpoint(
            model=model,
            optimizer=optimizer,
            step=step,
            loss_sum=self.loss_sum,
            correct_sum=self.correct_sum,
            count_sum=self.count_sum,
            **self.clip_sums,
            ema={f"v{i}": e for i, e in enumerate(ema)},
        )

    def variables(self) -> list:
        """Every variable of the run, in a fixed order: the model's, the optimizer's, the step, the running
        metrics, the EMA (what :class:`RunCache` copies from a fresh build)."""
        return [*self.model.variables, *self.optimizer.variables, self.step, *self.acc_vars, *self.ema]

    def prep(self, x):
        """``uint8`` images to the network's input: to float, per-channel normalized (on the device)."""
        import tensorflow as tf

        return (tf.cast(x, tf.float32) / 255.0 - self.mean) / self.std


class RunCache:
    """The traced functions of each arm, kept across the runs (seeds) of one experiment in one process.

    Tracing the training step and the evaluation of the convnet with its normalization layers costs about as
    much as a few hundred steps of a small run, once per run. With a cache, a later run of an arm that was
    already traced (same config but the seed, same dataset object, the default strategy) builds its model and
    optimizer as before, from its own seed, copies every value into the first run's variables and reuses that
    run's functions: the same initial values, the same graph, so the same numbers bit for bit
    (``tests/test_repro_pipeline.py`` compares). :func:`renorm_repro.cli.run_experiment` passes one per command.
    """

    def __init__(self):
        self._entries = {}

    @staticmethod
    def _key(run: _RunCall):
        import dataclasses

        if run.cfg.strategy != "default":
            return None
        return repr(dataclasses.replace(run.cfg, seeds=(run.cfg.seeds[0],))), run.arm, id(run.dataset)

    def adopt(self, run: _RunCall, fresh: _RunState):
        """``(state, train_step, evaluate)`` holding ``fresh``'s values if this arm was traced, else None."""
        key = self._key(run)
        entry = self._entries.get(key) if key is not None else None
        if entry is None or entry["dataset"] is not run.dataset:
            return None
        st, new = entry["state"], fresh.variables()
        old = st.variables()
        if len(old) != len(new) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(old, new)):
            return None  # not the same structure (cannot happen for one config): trace again
        for a, b in zip(old, new):
            a.assign(b.numpy())
        return st, entry["train_step"], entry["evaluate"]

    def keep(self, run: _RunCall, st: _RunState, train_step, evaluate) -> None:
        key = self._key(run)
        if key is not None:
            self._entries[key] = {"dataset": run.dataset, "state": st, "train_step": train_step, "evaluate": evaluate}


def _prepare_run_dir(run: _RunCall) -> TrainResult | None:
    """Check the folder against ``run.resume`` and deal with a ``done.json``; the result when there is nothing to do."""
    cfg, rdir, done, log = run.cfg, run.rdir, run.done, run.log
    if (cfg.val_examples > 0) != (run.dataset.y_val is not None):
        raise ValueError(
            f"val_examples={cfg.val_examples} but the dataset has "
            f"{'no' if run.dataset.y_val is None else len(run.dataset.y_val)} validation examples: "
            f"load it with load_dataset(..., val_examples={cfg.val_examples})."
        )
    if rdir.exists() and any(rdir.iterdir()) and not run.resume:
        raise RunDirError(f"Run directory {rdir} is not empty; pass --resume to continue it.")
    # Under multiworker every worker must skip or train this run together (the workers agree later).
    if done.is_file() and cfg.strategy != "multiworker":
        final = _done_step(done)
        if final == cfg.steps:
            log(f"{run.label} already complete ({done}); skipping.")
            return TrainResult(final_step=final, stopped=False)
        if final is not None and final < cfg.steps:
            log(f"{run.label} complete at step {final}; extending it to {cfg.steps} steps")
        else:
            log(
                f"{run.label} {done} is damaged or names another length ({final}); resuming the run from "
                f"its checkpoints"
            )
        done.unlink()
    rdir.mkdir(parents=True, exist_ok=True)
    run.ckpt_dir.mkdir(exist_ok=True)
    return None


def _build_state(run: _RunCall, strategy) -> _RunState:
    """The model, optimizer, step counter, running metrics and EMA, created under ``strategy``'s scope."""
    import tensorflow as tf

    cfg, arm, dataset = run.cfg, run.arm, run.dataset
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas or (cfg.batch_size // replicas) % cfg.arm_spec(arm)["microbatch_size"]:
        raise RunDirError(
            f"batch_size={cfg.batch_size} over {replicas} replicas is not a multiple of the "
            f"{arm} group size {cfg.arm_spec(arm)['microbatch_size']} per replica."
        )
    with strategy.scope():
        model = build_model(
            dataset.image_shape, dataset.num_classes, cfg.width, lambda name: make_norm_layer(cfg, arm, name)
        )
        optimizer = _optimizer(cfg)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        acc_vars = [
            tf.Variable(
                0.0,
                dtype=tf.float64,
                trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )
            for _ in range(6 if cfg.log_clip_means else 3)
        ]
        ema = (
            [tf.Variable(v, trainable=False, name="ema") for v in model.trainable_variables]
            if cfg.ema_decay > 0
            else []
        )
    mean = tf.constant(dataset.mean / 255.0, tf.float32)
    std = tf.constant(dataset.std / 255.0, tf.float32)
    return _RunState(cfg, model, optimizer, step, acc_vars, ema, mean, std)


def _agree_across_workers(run: _RunCall, strategy) -> tuple[int | None, TrainResult | None]:
    """Under ``multiworker``: the checkpoint step every worker restores, and the result when all are done.

    ``(None, None)`` for the other strategies (each process decides alone).
    """
    if run.cfg.strategy != "multiworker":
        return None, None
    done, label, log = run.done, run.label, run.log
    agreed, all_done = _agree_on_checkpoint(
        strategy, run.ckpt_dir, resume=run.resume, done=done.is_file(), label=label, log=log
    )
    if all_done:
        log(f"{label} already complete ({done}) on every worker; skipping.")
        return None, TrainResult(final_step=json.loads(done.read_text())["final_step"], stopped=False)
    if done.is_file():
        log(
            f"{label} complete here, but not on every worker: training again from "
            f"{'step 0' if agreed is None else f'the common checkpoint at step {agreed}'} with them"
        )
        done.unlink()
    return agreed, None


def _restore(run: _RunCall, st: _RunState, agreed: int | None):
    """Resume from the newest intact checkpoint (``agreed``'s under ``multiworker``), if ``run.resume``.

    Returns ``(start, restored, metrics, damaged_log)``: the step training starts from, the checkpoint
    number restored (or None), the run's :class:`MetricsLog` (not started yet) and
    :meth:`MetricsLog.damaged_bound` (or None).
    """
    cfg, label, log, multiworker = run.cfg, run.label, run.log, run.cfg.strategy == "multiworker"
    restored = None
    metrics = MetricsLog(run.rdir / "metrics.csv", metric_columns(cfg))
    damaged_log = metrics.damaged_bound(cfg) if run.resume and not multiworker else None
    if damaged_log:
        log(
            f"{label} {metrics.path} line {damaged_log[1]} is damaged: falling back to the newest intact "
            f"checkpoint at or before step {damaged_log[0]}, whose rows are intact, and dropping the log from "
            f"that line on (training recomputes it)"
        )
    if run.resume:
        at_most = (agreed or 0) if multiworker else (damaged_log[0] if damaged_log else None)
        restored = _restore_newest_intact(
            st.ckpt,
            run.ckpt_dir,
            label,
            log,
            at_most=at_most,
            newer_why="newer than the damaged log's rows" if damaged_log else None,
        )
    start = 0
    if restored is not None:
        start = int(st.step.numpy())
        log(
            f"{label} resumed from {run.ckpt_dir / f'ckpt-{restored}'} at step {start}"
            + (" (the newest checkpoint every worker holds)" if multiworker else "")
        )
    elif run.resume and (run.rdir / "metrics.csv").exists():
        log(
            f"{label} no checkpoint in {run.rdir}"
            + (" that every worker holds" if multiworker else "")
            + "; starting this run over from step 0"
        )
    return start, restored, metrics, damaged_log


def _start_logs(run: _RunCall, metrics: MetricsLog, start: int, damaged_log) -> EventLog:
    """Reconcile ``metrics.csv`` and the TensorBoard events with step ``start``; the open :class:`EventLog`."""
    cfg, label, log = run.cfg, run.label, run.log
    metrics.start(start, evaluation_steps(cfg, start), lenient=bool(damaged_log))
    events = EventLog(run.rdir / TENSORBOARD_DIR, enabled=run.tensorboard)
    kept = events.start(start, read_metrics(metrics.path) if run.tensorboard and start else None)
    if events.damage:
        log(f"{label} {events.damage}; continuing")
    lacking = sorted(set(evaluation_steps(cfg, start)) - set(kept)) if run.tensorboard else []
    if lacking:
        log(
            f"{label} the TensorBoard events lack steps {lacking[0]}..{lacking[-1]} ({len(lacking)} "
            f"evaluations; metrics.csv has them); continuing"
        )
    return events


def _write_run_record(run: _RunCall, replicas: int) -> None:
    """``config.json`` (the config, the arm's normalization, the data, the replicas) and ``versions.json``."""
    cfg, arm = run.cfg, run.arm
    record = {
        "config": config_to_dict(cfg),
        "arm": arm,
        "seed": run.seed,
        "normalization": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in cfg.arm_spec(arm).items()},
        "dataset": run.dataset.summary(),
        "replicas": replicas,
    }
    _write_json(run.rdir / "config.json", record)
    record_versions(run.rdir / "versions.json")


def _input_pipeline(run: _RunCall, strategy, start: int):
    """The batches of steps ``start`` to ``cfg.steps`` (``uint8`` images, ``int64`` labels), as the strategy takes them.

    ``default``: a generator of tensors; ``mirrored`` (through ``tf.data``) splits each global batch into consecutive
    per-replica slices; under ``multiworker`` each worker feeds its own replicas' slices (:func:`_worker_slices`).
    """
    import tensorflow as tf

    cfg, arm, seed, dataset = run.cfg, run.arm, run.seed, run.dataset
    x_train, y_train = dataset.x_train, dataset.y_train

    def batches():
        for t in range(start, cfg.steps):
            idx = cfg.train_batch_indices(y_train, seed, t, arm)
            yield x_train[idx], y_train[idx]

    if cfg.strategy == "multiworker":
        per_replica = cfg.batch_size // strategy.num_replicas_in_sync
        return strategy.distribute_datasets_from_function(
            _worker_slices(batches, dataset.image_shape, strategy.num_replicas_in_sync, per_replica)
        )
    if cfg.strategy == "default":
        # One process, one device: the batch is a NumPy gather, handed to the step as it is. tf.data's
        # from_generator ran the same generator in a thread of its own that took the GIL from the training loop at
        # every step: a third of a small run's time (the digits main job), the same bits.
        return ((tf.constant(xb), tf.constant(yb)) for xb, yb in batches())
    sig = (tf.TensorSpec((cfg.batch_size,) + dataset.image_shape, tf.uint8), tf.TensorSpec((cfg.batch_size,), tf.int64))
    ds = tf.data.Dataset.from_generator(batches, output_signature=sig).prefetch(tf.data.AUTOTUNE)
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    opts.deterministic = True
    ds = ds.with_options(opts)
    return strategy.experimental_distribute_dataset(ds) if cfg.strategy == "mirrored" else ds


def _worker_slices(batches, image_shape, replicas: int, per: int):
    """The dataset function of ``distribute_datasets_from_function``: a worker's replicas' slices of each batch."""
    import tensorflow as tf

    def worker_dataset(ctx):
        """This worker's replicas' slices of each global batch, in replica order."""
        local = replicas // ctx.num_input_pipelines
        first = ctx.input_pipeline_id * local

        def slices():
            for xb, yb in batches():
                for r in range(first, first + local):
                    yield xb[r * per : (r + 1) * per], yb[r * per : (r + 1) * per]

        spec = (tf.TensorSpec((per,) + image_shape, tf.uint8), tf.TensorSpec((per,), tf.int64))
        return tf.data.Dataset.from_generator(slices, output_signature=spec).prefetch(tf.data.AUTOTUNE)

    return worker_dataset


def _replica_step(cfg, st: _RunState, x, y) -> None:
    """One replica's share of a training step: loss, gradients, update, EMA, running metrics, clip fractions."""
    import keras
    import tensorflow as tf

    x = st.prep(x)
    with tf.GradientTape() as tape:
        logits = st.model(x, training=True)
        per_ex = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        loss = tf.reduce_sum(per_ex) / cfg.batch_size  # global batch: sums over replicas
        scaled = st.optimizer.scale_loss(loss) if cfg.precision == "mixed_float16" else loss
    grads = tape.gradient(scaled, st.model.trainable_variables)
    st.optimizer.apply(grads, st.model.trainable_variables)
    if st.ema:
        t = tf.cast(st.step, tf.float32) + 1.0
        decay = tf.minimum(cfg.ema_decay, (1.0 + t) / (10.0 + t))  # tf.train.ExponentialMovingAverage's
        for e, v in zip(st.ema, st.model.trainable_variables):
            e.assign(decay * e + (1.0 - decay) * tf.cast(v, e.dtype))
    correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float64))
    st.loss_sum.assign_add(tf.cast(tf.reduce_sum(per_ex), tf.float64))
    st.correct_sum.assign_add(correct)
    st.count_sum.assign_add(tf.cast(tf.shape(y)[0], tf.float64))
    if (
        st.clip_sums and st.clip_layers
    ):  # this step's clipped fractions, averaged over layers (per replica; summed on read)
        for key, attr in (("r_clip_sum", "r_clipped_fraction"), ("d_clip_sum", "d_clipped_fraction")):
            st.clip_sums[key].assign_add(
                tf.add_n([tf.cast(getattr(layer, attr), tf.float64) for layer in st.clip_layers]) / len(st.clip_layers)
            )
        st.clip_sums["clip_steps"].assign_add(tf.constant(1.0, tf.float64))


def _train_step(cfg, st: _RunState, strategy):
    """The compiled training step ``train_step(x, y)``: :func:`_replica_step` on every replica, then ``step += 1``."""
    import tensorflow as tf

    distributed = cfg.strategy in ("mirrored", "multiworker")

    @tf.function(jit_compile=cfg.jit_compile, autograph=False)
    def _step_fn(x, y):
        _replica_step(cfg, st, x, y)

    @tf.function(autograph=False)
    def train_step(x, y):
        if distributed:
            strategy.run(_step_fn, args=(x, y))
        else:
            _step_fn(x, y)
        st.step.assign_add(1)

    return train_step


def _eval_step(cfg, st: _RunState, *, training: bool):
    """The compiled ``(loss sum, correct count)`` of a batch; ``training=True``: with batch statistics."""
    import keras
    import tensorflow as tf

    @tf.function(jit_compile=cfg.jit_compile, autograph=False)
    def eval_batch(x, y):
        logits = st.model(st.prep(x), training=training)  # training: the caller restores the state
        per_ex = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return tf.reduce_sum(per_ex), tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), y), tf.float32))

    return eval_batch


def _mean_over(fn, x_all, y_all, chunks) -> tuple[float, float]:
    """Mean loss and accuracy of ``fn`` (:func:`_eval_step`) over the examples ``chunks`` (slices or indices) pick."""
    total_loss = total_correct = 0.0
    for sl in chunks:
        loss, correct = fn(x_all[sl], y_all[sl])
        total_loss += float(loss)
        total_correct += float(correct)
    m = sum(len(y_all[sl]) for sl in chunks)
    return total_loss / m, total_correct / m


class _Evaluator:
    """Every evaluation of the config; calling it gives ``{column: value}`` (EMA weights if any).

    Validation (the held-out split of the ``val_*`` columns), test, and a fixed training subset in
    inference mode; validation with batch statistics on minibatches built like the training ones (the
    state restored afterwards); the moving statistics' lag (:meth:`lag_stats`).
    """

    def __init__(self, run: _RunCall, st: _RunState):
        import keras

        cfg, dataset, self.cfg, self.st, self.dataset = run.cfg, run.dataset, run.cfg, st, run.dataset
        self.eval_batch = _eval_step(cfg, st, training=False)
        self.eval_batch_stats = _eval_step(cfg, st, training=True)
        x_train, y_train = dataset.x_train, dataset.y_train
        # The held-out split of the val_* columns: the validation split when the config carves one
        # (then the test split gets test_* columns), else the test split (the digits results).
        self.x_val, self.y_val = (
            (dataset.x_val, dataset.y_val) if dataset.y_val is not None else (dataset.x_test, dataset.y_test)
        )
        self.val_chunks = self._ranges(len(self.y_val))
        self.test_chunks = self._ranges(len(dataset.y_test)) if dataset.y_val is not None else None
        lag_sub = (
            train_eval_subset(len(y_train), cfg.eval_lag_examples, seed=2_000_003) if cfg.eval_lag_examples else None
        )
        self.lag_model = None
        if lag_sub is not None:
            self.lag_model = keras.Model(st.model.inputs, [layer.input for layer in st.norm_layers])
            self.x_lag = x_train[lag_sub]
        train_sub = train_eval_subset(len(y_train), cfg.eval_train_examples) if cfg.eval_train_examples else None
        self.train_sub = None
        if train_sub is not None:
            self.train_sub = (x_train[train_sub], y_train[train_sub], self._ranges(len(train_sub)))
        self.batchstat_chunks = (
            [cfg.eval_batch_indices(self.y_val, i, run.arm) for i in range(cfg.eval_batch_count(len(self.y_val)))]
            if cfg.eval_batch_stats
            else []
        )
        self._init_precise(x_train)

    def _init_precise(self, x_train) -> None:
        """Precise BN's fixed training batches and, per normalization layer, the model up to its input."""
        import keras

        from renorm.tf import BatchRenormalization

        self.precise_batches = self.precise_models = None
        if not self.cfg.precise_bn_batches:
            return
        # Only this package's layer is recomputed (every arm but keras_brn and gn): its inference
        # reads moving_mean and moving_stddev alone. The others get NaN columns.
        self.precise_ok = all(isinstance(layer, BatchRenormalization) for layer in self.st.norm_layers)
        if self.precise_ok:
            self.precise_batches = np.stack(self.cfg.precise_bn_indices(len(x_train)))  # (N, batch_size)
            self.x_train = x_train
            self.precise_models = [keras.Model(self.st.model.inputs, layer.input) for layer in self.st.norm_layers]

    def _ranges(self, n):
        return [slice(i, i + self.cfg.eval_batch_size) for i in range(0, n, self.cfg.eval_batch_size)]

    def __call__(self) -> dict:
        import tensorflow as tf

        model, ema = self.st.model, self.st.ema
        backup = None
        if ema:
            backup = [v.numpy() for v in model.trainable_variables]
            for v, e in zip(model.trainable_variables, ema):
                v.assign(tf.cast(e, v.dtype))
        res = {}
        res["val_loss"], res["val_accuracy"] = _mean_over(self.eval_batch, self.x_val, self.y_val, self.val_chunks)
        if self.test_chunks is not None:
            res["test_loss"], res["test_accuracy"] = _mean_over(
                self.eval_batch, self.dataset.x_test, self.dataset.y_test, self.test_chunks
            )
        if self.train_sub is not None:
            res["train_eval_loss"], res["train_eval_accuracy"] = _mean_over(self.eval_batch, *self.train_sub)
        if self.batchstat_chunks:
            state = [v.numpy() for v in model.non_trainable_variables]
            res["val_batchstat_loss"], res["val_batchstat_accuracy"] = _mean_over(
                self.eval_batch_stats, self.x_val, self.y_val, self.batchstat_chunks
            )
            for v, b in zip(model.non_trainable_variables, state):
                v.assign(b)
        if self.lag_model is not None:
            res.update(self.lag_stats())
        if self.cfg.precise_bn_batches:
            res.update(self.precise_evaluation())
        if backup is not None:
            for v, b in zip(model.trainable_variables, backup):
                v.assign(b)
        return res

    def precise_statistics(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Precise BN: every layer's population ``(mean, stddev)`` over the fixed batches, layer by layer.

        Layer ``j``'s input is computed in inference mode with layers ``< j`` already using their recomputed
        statistics (assigned here: the caller restores the state). Per batch ``b`` (all the batch's examples and
        positions) its mean ``m_b`` and biased variance ``v_b`` in float64; the population mean is the mean of the
        ``m_b``, its variance the mean of the ``v_b`` plus the variance of the ``m_b`` (equal batches: exactly the
        moments of the pooled examples); ``stddev = sqrt(var + epsilon)``, the layer's convention.
        """
        cfg, st = self.cfg, self.st
        nb, bs = self.precise_batches.shape
        per_call = max(1, cfg.eval_batch_size // bs)  # whole batches per forward pass
        stats = []
        for layer, sub in zip(st.norm_layers, self.precise_models):
            means, variances = [], []
            for i in range(0, nb, per_call):
                idx = self.precise_batches[i : i + per_call]
                f = np.asarray(sub(st.prep(self.x_train[idx.reshape(-1)]), training=False), dtype=np.float64)
                f = f.reshape(len(idx), -1, f.shape[-1])  # (batches, examples x positions, channels)
                means.append(f.mean(axis=1))
                variances.append(f.var(axis=1))
            m, v = np.concatenate(means), np.concatenate(variances)
            mean = m.mean(axis=0)
            var = v.mean(axis=0) + ((m - mean) ** 2).mean(axis=0)
            stddev = np.sqrt(var + cfg.epsilon)
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_stddev.assign(stddev.astype(np.float32))
            stats.append((mean, stddev))
        return stats

    def precise_evaluation(self) -> dict:
        """The inference-mode evaluations again with :meth:`precise_statistics`: the ``*_precise`` columns.

        On a copy of the state: every non-trainable variable (moving statistics, step counters, diagnostics) is
        saved before and assigned back after, bit for bit; no data stream or RNG of the training loop is read.
        NaN for arms whose layers are not this package's (``keras_brn``, ``gn``).
        """
        from renorm_repro.runs import precise_columns

        if not self.precise_ok:
            return dict.fromkeys(precise_columns(self.cfg), float("nan"))
        model = self.st.model
        state = [v.numpy() for v in model.non_trainable_variables]
        try:
            self.precise_statistics()
            res = {}
            res["val_loss_precise"], res["val_accuracy_precise"] = _mean_over(
                self.eval_batch, self.x_val, self.y_val, self.val_chunks
            )
            if self.test_chunks is not None:
                res["test_loss_precise"], res["test_accuracy_precise"] = _mean_over(
                    self.eval_batch, self.dataset.x_test, self.dataset.y_test, self.test_chunks
                )
            if self.train_sub is not None:
                res["train_eval_loss_precise"], res["train_eval_accuracy_precise"] = _mean_over(
                    self.eval_batch, *self.train_sub
                )
        finally:
            for v, b in zip(model.non_trainable_variables, state):
                v.assign(b)
        return res

    def lag_stats(self) -> dict:
        """Per layer: mean over features of |moving mean - mean| / std and |log(moving stddev / std)|.

        ``mean``, ``std`` (``sqrt(var + epsilon)``) are the statistics of the layer's input over the
        fixed training subset, in float64, with the network in inference mode upstream.
        """
        norm_layers, x_lag = self.st.norm_layers, self.x_lag
        n = len(norm_layers)
        s1, s2, cnt = [0.0] * n, [0.0] * n, [0] * n
        for i in range(0, len(x_lag), 500):
            feats = self.lag_model(self.st.prep(x_lag[i : i + 500]), training=False)
            for j, f in enumerate(feats):
                f = np.asarray(f, dtype=np.float64).reshape(-1, f.shape[-1])
                s1[j] = s1[j] + f.sum(0)
                s2[j] = s2[j] + (f * f).sum(0)
                cnt[j] += f.shape[0]
        res = {}
        for j, layer in enumerate(norm_layers):
            if not hasattr(layer, "moving_stddev"):  # the gn arm: no moving statistics to lag
                res[f"lag_mean_norm{j + 1}"] = res[f"lag_std_norm{j + 1}"] = float("nan")
                continue
            mu = s1[j] / cnt[j]
            std = np.sqrt(np.maximum(s2[j] / cnt[j] - mu * mu, 0.0) + self.cfg.epsilon)
            mm = np.asarray(layer.moving_mean.numpy(), np.float64)
            ms = np.asarray(layer.moving_stddev.numpy(), np.float64)
            res[f"lag_mean_norm{j + 1}"] = float(np.mean(np.abs(mm - mu) / std))
            res[f"lag_std_norm{j + 1}"] = float(np.mean(np.abs(np.log(ms / std))))
        return res


class _Clock:
    """Wall clock of one call: from its start, and at the first (compiling) and last timed training steps."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.first = self.last = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def mark(self) -> None:
        now = time.perf_counter()
        self.first = now if self.first is None else self.first
        self.last = now

    def steps_per_s(self, timed: int) -> float | None:
        """Training steps per second after the first: ``timed`` steps between the first mark and the last."""
        return timed / (self.last - self.first) if timed > 0 and self.last > self.first else None


def _layer_mean(layers, attr: str) -> float:
    """The mean over ``layers`` of the scalar variable ``attr``; NaN when there is no layer."""
    return float(np.mean([getattr(layer, attr).numpy() for layer in layers])) if layers else float("nan")


def _evaluation_row(cfg, st: _RunState, schedule, step: int, evals: dict, clock: _Clock) -> dict:
    """The ``metrics.csv`` row after ``step`` steps: running training metrics, limits, clip fractions, ``evals``."""
    cnt = max(st.count_sum.numpy(), 1.0)
    rmax_t, dmax_t = schedule.limits(step - 1)
    clip = st.clip_sums if st.clip_layers else {}
    nan_clip = {"r_clipped_mean": float("nan"), "d_clipped_mean": float("nan")} if st.clip_sums else {}
    clip_means = (
        {
            "r_clipped_mean": clip["r_clip_sum"].numpy() / max(clip["clip_steps"].numpy(), 1.0),
            "d_clipped_mean": clip["d_clip_sum"].numpy() / max(clip["clip_steps"].numpy(), 1.0),
        }
        if clip
        else nan_clip
    )
    return {
        "step": step,
        "train_loss": st.loss_sum.numpy() / cnt,
        "train_accuracy": st.correct_sum.numpy() / cnt,
        "val_loss": evals["val_loss"],
        "val_accuracy": evals["val_accuracy"],
        "rmax": float(rmax_t),
        "dmax": float(dmax_t),
        # NaN for the gn arm (no clip diagnostics)
        "r_clipped": _layer_mean(st.clip_layers, "r_clipped_fraction"),
        "d_clipped": _layer_mean(st.clip_layers, "d_clipped_fraction"),
        "elapsed_s": clock.elapsed(),
        "learning_rate": float(cfg.learning_rate_at(step - 1)),
        **clip_means,
        **evals,
    }


def _log_line(run: _RunCall, row: dict) -> str:
    """The one log line of an evaluation."""
    return (
        f"{run.label} step {row['step']}/{run.cfg.steps} train_loss {row['train_loss']:.4f} "
        f"train_acc {row['train_accuracy']:.4f} val_loss {row['val_loss']:.4f} "
        f"val_acc {row['val_accuracy']:.4f} rmax {row['rmax']:.2f} dmax {row['dmax']:.2f} "
        f"r_clip {row['r_clipped']:.3f} d_clip {row['d_clipped']:.3f}"
        + (f" train_eval_acc {row['train_eval_accuracy']:.4f}" if "train_eval_accuracy" in row else "")
        + (f" val_batchstat_acc {row['val_batchstat_accuracy']:.4f}" if "val_batchstat_accuracy" in row else "")
        + (f" val_acc_precise {row['val_accuracy_precise']:.4f}" if "val_accuracy_precise" in row else "")
    )


def _record_evaluation(st: _RunState, row: dict, metrics: MetricsLog, events: EventLog) -> None:
    """Start the running training metrics over, and write ``row`` to ``metrics.csv`` and TensorBoard."""
    for v in st.acc_vars:
        v.assign(0.0)
    metrics.append(row)
    events.append(
        row["step"],
        {
            **{k: row[k] for k in metrics.columns if k != "step"},
            **{k: v for layer in st.clip_layers for k, v in layer_scalars(layer).items()},
        },
    )


def _train_loop(
    run: _RunCall,
    st: _RunState,
    data,
    train_step,
    evaluate: _Evaluator,
    logs,
    manager,
    *,
    start: int,
    saved: int | None,
):
    """Train from step ``start``: evaluate and log, then checkpoint, on schedule; stop after ``run.stop_after``.

    ``logs``: ``(metrics, events)``; the events are closed on the way out. Returns ``(step reached,
    stopped, clock)``. A signal (Ctrl-C, SIGTERM) is taken between steps and raised as :class:`Interrupted`.
    """
    from tqdm.auto import tqdm

    cfg, (metrics, events) = run.cfg, logs
    schedule = cfg.arm_spec(run.arm)["schedule"]
    clock = _Clock()
    tick = run.progress if callable(run.progress) else None  # a parent's bar (renorm_repro.parallel)
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=f"{run.arm} seed{run.seed}",
        disable=tick is not None or not run.progress,
        dynamic_ncols=True,
        leave=False,
    )
    cur, stopped = start, False
    logged = time.monotonic()  # when this run last wrote an evaluation line (or started)
    try:
        with interrupts.deferred():  # a signal is recorded, and raised between steps
            for x, y in data:
                interrupts.check()
                train_step(x, y)
                cur += 1
                bar.update(1)
                if tick is not None:
                    tick(cur)
                if cur == start + 1 or cur == cfg.steps or cur % cfg.eval_every == 0:
                    st.step.numpy()  # wait for the device
                    clock.mark()
                if cur % cfg.eval_every == 0 or cur == cfg.steps:
                    row = _evaluation_row(cfg, st, schedule, cur, evaluate(), clock)
                    _record_evaluation(st, row, metrics, events)
                    if cur == cfg.steps or time.monotonic() - logged >= run.log_interval:
                        run.log(_log_line(run, row)) if bar.disable else bar.write(_log_line(run, row))
                        logged = time.monotonic()
                    bar.set_postfix(val_acc=f"{row['val_accuracy']:.3f}")
                if cur % cfg.checkpoint_every == 0 or cur == cfg.steps:
                    manager.save(checkpoint_number=cur)
                    saved = cur
                if run.stop_after is not None and cur - start >= run.stop_after and cur < cfg.steps:
                    stopped = True
                    break
            interrupts.check()  # one received during the last step
    except KeyboardInterrupt as e:
        bar.close()
        raise Interrupted(f"{run.arm} seed{run.seed}", cur, saved, getattr(e, "signum", None)) from None
    finally:
        bar.close()
        events.close()
    return cur, stopped, clock


def _finish(run: _RunCall, cur: int, start: int, stopped: bool, clock: _Clock) -> TrainResult:
    """Write ``done.json`` (final step, wall time, training speed) unless stopped; the call's result."""
    if stopped:
        return TrainResult(final_step=cur, stopped=True, train_steps_per_s=None)
    timed = cur - start - 1
    _write_json(
        run.done,
        {
            "final_step": cur,
            "wall_s": clock.elapsed(),
            "train_steps_per_s": clock.steps_per_s(timed),
            "timed_steps": timed,
        },
    )
    rate = json.loads(run.done.read_text()).get("train_steps_per_s")
    return TrainResult(final_step=cur, stopped=False, train_steps_per_s=rate)


def train_run(
    cfg,
    arm: str,
    seed: int,
    rdir,
    dataset: Dataset,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool | Callable[[int], None] = True,
    tensorboard: bool = True,
    log: Callable[[str], None] = print,
    log_interval: float = LOG_INTERVAL_S,
    cache: RunCache | None = None,
) -> TrainResult:
    """Train ``arm`` with ``seed`` into ``rdir``; see the module docstring.

    ``resume`` continues from the newest intact checkpoint in ``rdir``
    (dropping log rows written after it; see the module docstring).
    ``stop_after`` stops after that many steps of this call without a final
    checkpoint, as if the process had been killed (used to test ``resume``).
    Ctrl-C raises :class:`renorm_repro.runs.Interrupted` (the step reached
    and the last checkpoint). ``tensorboard`` writes TensorBoard event files
    into ``rdir/tensorboard`` (:mod:`renorm_repro.tensorboard_log`).
    ``progress``: a progress bar (``True``), none (``False``), or a function
    called with the step reached after every step (and no bar).
    ``log`` gets the run's last evaluation line, and any other evaluation's
    once ``log_interval`` seconds have passed since the previous line (``0``:
    every evaluation); ``metrics.csv`` holds every evaluation either way.
    ``cache`` (a :class:`RunCache` shared by the runs of one experiment)
    reuses the traced functions of an earlier run of the same arm.
    """
    import keras
    import tensorflow as tf

    if not log_interval >= 0:  # NaN too
        raise ValueError(f"log_interval must be >= 0 seconds, got {log_interval!r}.")
    run = _RunCall(
        cfg,
        arm,
        seed,
        rdir,
        dataset,
        resume=resume,
        stop_after=stop_after,
        progress=progress,
        tensorboard=tensorboard,
        log=log,
        log_interval=log_interval,
    )
    skipped = _prepare_run_dir(run)
    if skipped is not None:
        return skipped
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(cfg.precision)
    try:
        strategy = _strategy(cfg.strategy)
        st = _build_state(run, strategy)
        reused = cache.adopt(run, st) if cache is not None else None
        if reused is not None:
            st = reused[0]
        agreed, skipped = _agree_across_workers(run, strategy)
        if skipped is not None:
            return skipped
        start, restored, metrics, damaged_log = _restore(run, st, agreed)
        manager = tf.train.CheckpointManager(st.ckpt, str(run.ckpt_dir), max_to_keep=2)
        events = _start_logs(run, metrics, start, damaged_log)
        _write_run_record(run, strategy.num_replicas_in_sync)
        data = _input_pipeline(run, strategy, start)
        if reused is not None:
            train_step, evaluate = reused[1:]
        else:
            train_step, evaluate = _train_step(cfg, st, strategy), _Evaluator(run, st)
            if cache is not None:
                cache.keep(run, st, train_step, evaluate)
        cur, stopped, clock = _train_loop(
            run,
            st,
            data,
            train_step,
            evaluate,
            (metrics, events),
            manager,
            start=start,
            saved=start if restored is not None else None,
        )
        return _finish(run, cur, start, stopped, clock)
    finally:
        keras.mixed_precision.set_global_policy("float32")
