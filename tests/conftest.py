"""Fixtures shared by several test files (each imports its framework inside the fixture, so that a test file
of one backend never pulls in another's framework)."""

import importlib.util
import sys

import pytest

# TensorFlow 2.20/2.21 wheels load TensorFlow with RTLD_GLOBAL, and a later `import triton` (torch's CUDA
# wheels ship it; torch._dynamo, torch.optim and the first call of a torch.library custom op import it)
# then crashes the process: libtriton's LLVM binds to TensorFlow's copy (tensorflow/tensorflow#124205).
# Loaded first, triton keeps its own, so the TensorFlow and PyTorch tests can share one process
# (tests/test_torch_tf_process.py checks both orders in fresh interpreters).
if "tensorflow" not in sys.modules and all(importlib.util.find_spec(m) for m in ("triton", "tensorflow", "torch")):
    import triton  # noqa: F401


@pytest.fixture
def x64():
    """JAX with 64-bit types enabled for the test (the float64 parity cases)."""
    import jax

    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A data cache folder shared by the tests of one module (the reproduction's synthetic data is cached there)."""
    return tmp_path_factory.mktemp("cache")
