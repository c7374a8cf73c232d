from pathlib import Path

import pytest

from fp8_backend.testing.tiny_model import PROMPTS, build_tiny_llama

# Fixtures shared by tests in different folders (tests/support/quantize_cases.py).
pytest_plugins = ["quantize_cases"]


def pytest_configure(config):
    """The Triton interpreter (tests/support/triton_interpret.py) is switched on once, before any test
    module is imported: it must be on when triton itself is first imported, and vLLM imports
    triton too, so turning it on from a test module made results depend on collection order."""
    import triton_interpret  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return PROMPTS
