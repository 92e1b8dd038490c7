"""Fixtures shared by several test files (each imports its framework inside the fixture, so that a test file
of one backend never pulls in another's framework)."""

import pytest


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
