"""Ctrl-C (SIGINT) and SIGTERM for ``renorm-repro``: every signal is honoured, whatever runs when it comes.

Python's default SIGINT handler raises :class:`KeyboardInterrupt` wherever the
main thread happens to be. That is lost when it happens inside a callback whose
exceptions are printed and dropped (JAX's garbage-collection hook,
``_xla_gc_callback``, which runs at any allocation once TensorFlow has imported
JAX; ``__del__`` methods), and a ``KeyboardInterrupt`` raised in the middle of a
C extension's import can leave it half-initialized so that the interpreter
crashes at exit. So the command line (:func:`install`, before anything heavy is
imported) records the signal first, then:

- inside :func:`exit_now` blocks (the imports of the command's modules and of
  TensorFlow, before anything is written) it prints the one line and ends the
  process at once: a ``KeyboardInterrupt`` raised inside TensorFlow's import
  can crash the interpreter (exit 139);
- elsewhere outside :func:`deferred` blocks (data loading) it raises
  :class:`Stop` at once; if that is swallowed, the recorded signal is raised
  again at the next :func:`check`;
- inside them (the training loop, the report) it only records it; the loop
  calls :func:`check` after every step, where it is raised. A second signal
  raises at once.

The command then prints its one line and leaves with ``os._exit(128 + signal)``
(130 for SIGINT, 143 for SIGTERM), skipping an interpreter teardown that a
half-imported TensorFlow could crash (:func:`renorm_repro.cli.main`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

__all__ = ["Stop", "install", "uninstall", "pending", "check", "deferred", "exit_now", "exit_code", "signal_name"]

_state = {"signal": None, "defer": 0, "previous": None}


class Stop(KeyboardInterrupt):
    """A SIGINT or SIGTERM (``signum``) turned into an exception."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal_name(signum))
        self.signum = int(signum)


def signal_name(signum: int) -> str:
    return {int(signal.SIGINT): "SIGINT", int(signal.SIGTERM): "SIGTERM"}.get(int(signum), f"signal {signum}")


def exit_code(signum: int | None) -> int:
    """The shell's code for a process stopped by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signal.SIGINT if signum is None else signum)


def _handler(signum, frame):
    first = _state["signal"] is None
    if first:
        _state["signal"] = int(signum)
    leave = _state.get("exit_now")
    if leave is not None:  # nothing written yet, and raising here could crash a C extension's import
        text, fd = leave
        word = "interrupted" if signum == signal.SIGINT else f"terminated ({signal_name(signum)})"
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.write(fd, f"renorm-repro: {word} {text}\n".encode())
        os._exit(exit_code(signum))
    if first and _state["defer"]:
        return  # raised at the loop's next check()
    raise Stop(_state["signal"])


def install() -> None:
    """Record SIGINT and SIGTERM (see the module docstring). Main thread only; a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread() or _state["previous"] is not None:
        return
    _state["previous"] = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook = sys.unraisablehook

    def unraisable(info):  # a Stop swallowed by a callback (JAX's gc hook): recorded, raised at check()
        if not isinstance(info.exc_value, Stop):
            previous_hook(info)

    sys.unraisablehook = unraisable


def uninstall() -> None:
    """Put back the handlers :func:`install` replaced and forget any recorded signal (for tests)."""
    if _state["previous"] is not None:
        for s, h in _state["previous"].items():
            signal.signal(s, h)
    _state.update(signal=None, defer=0, previous=None, exit_now=None)


def pending() -> int | None:
    """The signal received so far (SIGINT or SIGTERM), or None."""
    return _state["signal"]


def check() -> None:
    """Raise :class:`Stop` if a signal has been received."""
    if _state["signal"] is not None:
        raise Stop(_state["signal"])


@contextlib.contextmanager
def exit_now(text: str, fd: int = 2):
    """A block (an import, before anything is written) in which a signal prints ``renorm-repro: interrupted
    <text>`` to ``fd`` and ends the process at once with its code. Only once :func:`install` ran."""
    if _state["previous"] is None:
        yield
        return
    if _state["signal"] is not None:  # received before the block: honoured now
        _state["exit_now"] = (text, fd)
        _handler(_state["signal"], None)
    saved = _state.get("exit_now")
    _state["exit_now"] = (text, fd)
    try:
        yield
    finally:
        _state["exit_now"] = saved


@contextlib.contextmanager
def deferred():
    """A block in which a first signal is only recorded; the block calls :func:`check` at safe points."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
