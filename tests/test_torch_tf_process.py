"""PyTorch after TensorFlow in one process (issue 34 item 2), each case in a fresh interpreter.

With TensorFlow 2.21 and a torch build that ships ``triton`` (the CUDA wheels, torch 2.14.1 here),
``import triton`` after ``import tensorflow`` crashes with a segmentation fault: TensorFlow's wheels
load it with ``RTLD_GLOBAL`` and libtriton's LLVM binds to TensorFlow's copy
(tensorflow/tensorflow#124205). ``torch._dynamo`` imports ``triton``, and the first call of a
``torch.library`` custom op imports ``torch._dynamo``, so the module's eager forward crashed the test
suite once the TensorFlow tests had run. A crash here fails the test instead of killing pytest.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("tensorflow") is None,
    reason="needs both PyTorch and TensorFlow",
)


def run_mode(mode):
    path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, str(HERE / "torch_tf_script.py"), mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"return code {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert f"torch-tf {mode} OK" in proc.stdout


def test_eager_training_step_after_tensorflow_loads_no_compiler():
    """TF conv2d + gradient, then an eager BatchRenorm2d training step: exits 0, without importing torch._dynamo."""
    run_mode("eager")


def test_optimizer_and_compiled_step_after_tensorflow_with_triton_loaded_first():
    """triton imported before TensorFlow (as tests/conftest.py does): torch.optim and torch.compile then work."""
    run_mode("compiled")
