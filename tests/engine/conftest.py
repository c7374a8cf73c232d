import pytest

HERE = __import__("pathlib").Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    """Every test under tests/engine starts vLLM engines, servers or producer processes: slow."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)
