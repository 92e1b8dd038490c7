"""TensorBoard event files of one run, kept consistent with ``metrics.csv`` across crashes and ``--resume``.

Each run writes ``<run>/tensorboard/`` (``tensorboard --logdir OUT/runs``
shows every arm and seed), at the same points as ``metrics.csv`` and nowhere
else: one scalar per column of the log row (the column's name is the tag;
the step is the ``step`` column) and, per normalization layer, the fraction
of ``r`` and ``d`` values the clip changed in the last training step and the
limits that step used (``norm1/r_clipped``, ``norm1/d_clipped``,
``norm1/rmax``, ``norm1/dmax``, ...). Scalars are written with
``tf.summary.write`` and the metadata of TensorBoard's scalars plugin (what
``tf.summary.scalar`` writes; it needs the ``tensorboard`` package, this does
not), and flushed to disk after the log row and before that step's checkpoint.

TensorFlow's writer starts a new file per process and cannot drop points, so
:meth:`EventLog.start` does what :meth:`renorm_repro.runs.MetricsLog.start`
does for the log, on resume: it reads every event file of the run (up to a
record a crash cut short), keeps the points at or before the checkpoint's
step, and replaces the files with one file of those points,
``events.out.tfevents.0.kept`` (its name sorts before any file the writer
makes, so readers meet the steps in order). The replacement is crash-safe:
the kept points are written to ``.kept.tmp``, flushed to disk and renamed to
``.kept.ready`` (neither name is an event file to TensorBoard); then the old
files are deleted and ``.kept.ready`` is renamed to the kept file. A crash
before the first rename leaves the old files (the next start begins again);
after it, the next start finishes the replacement. So at no time does the
folder hold a point twice or a point of steps the run will compute again.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["EventLog", "TENSORBOARD_DIR", "KEPT_NAME", "layer_scalars"]

#: The folder of a run's event files.
TENSORBOARD_DIR = "tensorboard"
#: The file that holds the points kept on resume.
KEPT_NAME = "events.out.tfevents.0.kept"
_TMP, _READY = ".kept.tmp", ".kept.ready"


def _event_files(logdir: Path) -> list[Path]:
    """The files TensorBoard reads in ``logdir`` (``tfevents`` in the name), in the order it reads them."""
    return sorted(p for p in logdir.iterdir() if "tfevents" in p.name and p.is_file())


def _records(path: Path) -> tuple[list[bytes], bool]:
    """The whole records of the event file ``path``, and whether it ended in a damaged or cut-short one."""
    import tensorflow as tf

    out = []
    try:
        for rec in tf.data.TFRecordDataset(str(path)):
            out.append(rec.numpy())
    except tf.errors.DataLossError:
        return out, True
    return out, False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def layer_scalars(layer) -> dict[str, float]:
    """A normalization layer's clip diagnostics of its last training step, tagged ``<layer name>/...``.

    ``r_clipped``, ``d_clipped``: the fractions of ``r`` and ``d`` values the
    clip changed; ``rmax``, ``dmax``: the limits of that step, from the
    layer's own step counter and clip schedule.
    """
    schedule = getattr(layer, "schedule", None) or layer._schedule  # renorm.tf's, or the Keras arm's
    rmax, dmax = schedule.limits(max(int(layer.step.numpy()) - 1, 0))
    return {
        f"{layer.name}/r_clipped": float(layer.r_clipped_fraction.numpy()),
        f"{layer.name}/d_clipped": float(layer.d_clipped_fraction.numpy()),
        f"{layer.name}/rmax": float(rmax),
        f"{layer.name}/dmax": float(dmax),
    }


def _span(steps) -> str:
    steps = sorted(steps)
    return ", ".join(map(str, steps)) if len(steps) <= 4 else f"{steps[0]}..{steps[-1]}"


def _scalar_summary(scalars: dict[str, float]):
    """One ``Summary`` holding every ``{tag: value}`` as a float32 scalar (TensorBoard shows each on its own)."""
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    return summary_pb2.Summary(
        value=[
            summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tf.make_tensor_proto(np.float32(v)))
            for tag, v in scalars.items()
        ]
    )


def _scalar_event(step: int, scalars: dict[str, float]) -> bytes:
    """One event record of ``{tag: value}`` at ``step``, as :meth:`EventLog.append` writes them."""
    import time

    from tensorflow.core.util import event_pb2

    return event_pb2.Event(wall_time=time.time(), step=int(step), summary=_scalar_summary(scalars)).SerializeToString()


class EventLog:
    """The TensorBoard event files of one run: :meth:`start` (reconcile), :meth:`append` per log row, :meth:`close`.

    With ``enabled=False`` nothing is written, but :meth:`start` still drops
    the points after the checkpoint from files an earlier session wrote, so
    they never contradict the resumed run.
    """

    def __init__(self, logdir, enabled: bool = True):
        self.logdir = Path(logdir)
        self.enabled = bool(enabled)
        self._writer = None
        self.damage = None

    def start(self, resume_step: int = 0, rows=None) -> list[int]:
        """Keep the points at steps ``<= resume_step`` (none when 0); returns their steps.

        ``rows``: the log's rows up to ``resume_step`` (``metrics.csv``, which
        is reconciled first). When a file is damaged (TensorFlow stops reading
        a file at its first bad record: flipped bytes, a cut), a point of one
        of the log's columns that the files lack is rewritten from the row; what cannot be
        rewritten (the layers' clip diagnostics of such steps) is lost. Either
        way :attr:`damage` says what happened, in one sentence, for the run's
        log (None when nothing at or before ``resume_step`` was missing).
        The writer (a new file) opens at the first :meth:`append`.
        """
        self.close()
        self.damage = None
        return self._reconcile(resume_step, rows or []) if self.logdir.is_dir() else []

    def _reconcile(self, resume_step: int, rows) -> list[int]:
        from tensorflow.core.util import event_pb2

        d = self.logdir
        (d / _TMP).unlink(missing_ok=True)  # a replacement cut short before it was complete
        if (d / _READY).exists():  # a complete replacement cut short before its renames: finish it
            for f in _event_files(d):
                f.unlink()
            (d / _READY).replace(d / KEPT_NAME)
        files = _event_files(d)
        rows = [r for r in rows if r["step"] <= resume_step]
        if not files:
            return []
        kept, steps, version, damaged = [], set(), None, []
        present = {}  # step -> the tags the files hold there
        for f in files:
            records, cut = _records(f)
            if cut:
                damaged.append(f.name)
            for rec in records:
                try:
                    ev = event_pb2.Event.FromString(rec)
                except Exception:  # noqa: BLE001 - a record whose checksum held but whose content does not parse
                    damaged.append(f.name)
                    continue
                if ev.HasField("file_version"):
                    version = rec if version is None else version
                elif ev.HasField("summary") and ev.step <= resume_step:
                    tags = {v.tag for v in ev.summary.value}
                    if tags <= present.get(int(ev.step), set()):
                        continue  # a point twice (a file written again by hand): once is enough
                    kept.append((int(ev.step), rec))
                    steps.add(int(ev.step))
                    present.setdefault(int(ev.step), set()).update(tags)
        # What the damage took: columns of the log are rewritten from it, the layers' diagnostics are lost.
        layer_tags = {t for tags in present.values() for t in tags if "/" in t}
        rebuilt, lost = 0, set()
        for row in rows if damaged else ():  # steps no file ever held (--no-tensorboard) are reported by the caller
            have = present.get(row["step"], set())
            missing = [k for k in row if k != "step" and k not in have]
            if missing:
                kept.append((row["step"], _scalar_event(row["step"], {k: row[k] for k in missing})))
                steps.add(row["step"])
                rebuilt += len(missing)
            if layer_tags - have:
                lost.add(row["step"])
        if rebuilt or lost:
            what = f"{rebuilt} point(s) of the log's columns rewritten from metrics.csv" + (
                f"; the layers' clip diagnostics of {len(lost)} step(s) ({_span(lost)}) are lost" if lost else ""
            )
            self.damage = (
                "the TensorBoard events were damaged or cut"
                + (f" ({', '.join(sorted(set(damaged)))})" if damaged else "")
                + f": {what}"
            )
        kept = [rec for _, rec in sorted(kept, key=lambda sr: sr[0])]  # stable: each step's points in file order
        if kept:
            import tensorflow as tf

            with tf.io.TFRecordWriter(str(d / _TMP)) as w:
                for rec in ([version] if version is not None else []) + kept:
                    w.write(rec)
            _fsync(d / _TMP)
            (d / _TMP).replace(d / _READY)
            _fsync(d)
        for f in files:
            f.unlink()
        if kept:
            (d / _READY).replace(d / KEPT_NAME)
        _fsync(d)
        return sorted(steps)

    def append(self, step: int, scalars: dict[str, float]) -> None:
        """Write ``{tag: value}`` at ``step`` and flush it to disk (no-op when disabled)."""
        if not self.enabled:
            return
        import tensorflow as tf

        if self._writer is None:
            # Flushed by append() only (max_queue and flush_millis out of reach): a point reaches the
            # disk with its whole evaluation, after the log row.
            self._writer = tf.summary.create_file_writer(str(self.logdir), max_queue=1 << 20, flush_millis=1 << 30)
        # One event holding every tag of the row: one op a row instead of one a tag, which cost a tenth of a small
        # run's time.
        with self._writer.as_default():
            tf.summary.experimental.write_raw_pb(_scalar_summary(scalars).SerializeToString(), step=int(step))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
