"""JAX checks that need a fresh interpreter: several virtual devices, and no TensorFlow."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def run_script(name, **env):
    full_env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, str(HERE / name)], env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_pooled_statistics_on_four_virtual_devices():
    """axis_name / axis_index_groups: shard_map and pmap equal the oracle on the concatenated batch."""
    out = run_script(
        "jax_multidevice_script.py",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_ENABLE_X64="1",
        JAX_PLATFORMS="cpu",
    )
    assert "multidevice OK" in out


def test_import_and_run_without_tensorflow():
    out = run_script("jax_no_tf_script.py", JAX_PLATFORMS="cpu")
    assert "no-tf OK" in out
