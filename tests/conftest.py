"""Shared pytest setup: make `tests.helpers` and `jaxllm` importable without installing the repo."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory fixture: tiny_model_dir(arch="llama", **overrides) -> path of a saved tiny HF model."""
    from tests.helpers.tiny_models import make_tiny_model

    def make(arch: str = "llama", **overrides):
        return make_tiny_model(tmp_path, arch=arch, **overrides)

    return make


@pytest.fixture(scope="module", autouse=True)
def release_executables():
    """After each test module, drop every compiled executable: each compiled step maps hundreds
    of memory pages, and one pytest process must stay under vm.max_map_count (65,530 here) for
    the whole suite, which compiles steps for many engine shapes. Modules share no executables
    worth keeping (their engine shapes differ)."""
    yield
    if "jax" in sys.modules:  # host-only modules never import jax; don't import it for them
        sys.modules["jax"].clear_caches()
