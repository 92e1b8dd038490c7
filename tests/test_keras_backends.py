"""renorm.keras.BatchRenormalization on every Keras backend installed, each in its own interpreter.

The Keras backend is fixed per process, so each backend runs
``tests/keras_backend_script.py`` in a subprocess with ``KERAS_BACKEND`` set,
on the shared case registry (tests/parity.py) against the NumPy oracle
(docs/SPEC.md, section 9). The TensorFlow backend's in-process tests are
tests/test_tf_*.py (the same class: ``renorm.tf.BatchRenormalization``);
the script on TensorFlow is marked slow, and so are the citizen and
applications checks on PyTorch (run them with ``pytest -m slow``). PyTorch
runs when ``torch`` is importable.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def installed(module):
    return importlib.util.find_spec(module) is not None


def backend(name, slow=False):
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[name]
    marks = [pytest.mark.skipif(not installed(module), reason=f"{module} is not installed")]
    return pytest.param(name, marks=marks + ([pytest.mark.slow] if slow else []))


# The default suite: the parity suite on JAX and PyTorch, the Keras-citizen checks and the
# keras.applications model on JAX (about 3 minutes on 2 loaded cores); the rest is slow.
PARITY_BACKENDS = [backend("jax"), backend("torch"), backend("tensorflow", slow=True)]
CITIZEN_BACKENDS = [backend("jax"), backend("torch", slow=True), backend("tensorflow", slow=True)]


def run_script(backend, *sections, x64=False, timeout=900):
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join([REPO, HERE]),
    )
    if x64:
        env["JAX_ENABLE_X64"] = "1"  # float64 on JAX (the float64 rows of the tolerance table)
    else:
        env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "keras_backend_script.py"), *sections],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"{backend} {sections} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert f"backend {backend}" in proc.stdout
    return proc.stdout


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
def test_parity_suite_against_the_oracle(backend):
    """Every registry case, float64 and float32, explicit gradient and autodiff, masks, mixed precision."""
    out = run_script(backend, "parity", x64=True)
    assert "parity OK" in out


@pytest.mark.parametrize("backend", CITIZEN_BACKENDS)
def test_keras_citizen_and_applications_model(backend):
    """Errors, fit, a custom loop, save/load, from_config; keras.applications MobileNetV2 converted, fit, saved,
    reloaded and exported (default precision: on JAX without jax_enable_x64, as a user has it)."""
    out = run_script(backend, "citizen", "apps")
    assert "citizen OK" in out and "apps OK" in out


def test_tf_alias_is_the_keras_class():
    """renorm.tf.BatchRenormalization and the converters are renorm.keras's (one class, one registration)."""
    pytest.importorskip("tensorflow")
    import keras

    import renorm.keras
    import renorm.tf

    assert renorm.tf.BatchRenormalization is renorm.keras.BatchRenormalization
    assert renorm.tf.convert_batch_norm is renorm.keras.convert_batch_norm
    assert renorm.tf.export_batch_norm is renorm.keras.export_batch_norm
    assert keras.saving.get_registered_object("renorm>BatchRenormalization") is renorm.keras.BatchRenormalization
