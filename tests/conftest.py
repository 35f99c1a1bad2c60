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
