"""vllm_adapter/settings.py: every environment variable the plugin reads, parsed in one place
(and read nowhere else in the package), each bad value named."""

import re
from pathlib import Path

import pytest

from fp8_backend.vllm_adapter import settings

PACKAGE = Path(settings.__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in (settings.ATTENTION_ENV, settings.MOE_ENV, settings.GPU_KERNELS_ENV, settings.EMULATE_ENV,
                 settings.KV_SCALES_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults(clean_env):
    assert settings.attention_mode() == "auto"
    assert settings.moe_choice() is None
    assert settings.gpu_kernels() is False and settings.emulate_w8a8() is False
    assert settings.kv_scales_file() is None


@pytest.mark.parametrize("name,value,read,want", [
    (settings.ATTENTION_ENV, " ALL ", settings.attention_mode, "all"),
    (settings.MOE_ENV, "Plugin", settings.moe_choice, "plugin"),
    (settings.GPU_KERNELS_ENV, "1", settings.gpu_kernels, True),
    (settings.EMULATE_ENV, "true", settings.emulate_w8a8, True),
    (settings.KV_SCALES_ENV, "/x/Scales.json", settings.kv_scales_file, "/x/Scales.json"),
])
def test_values(clean_env, name, value, read, want):
    clean_env.setenv(name, value)
    assert read() == want


@pytest.mark.parametrize("name,value,read,match", [
    (settings.ATTENTION_ENV, "fast", settings.attention_mode, r"FP8_BACKEND_ATTENTION='fast': expected one of auto, all, vllm"),
    (settings.MOE_ENV, "amx", settings.moe_choice, r"FP8_BACKEND_MOE: expected one of \['plugin', 'vllm'\].*found 'amx'"),
    (settings.GPU_KERNELS_ENV, "yes", settings.gpu_kernels, "FP8_BACKEND_GPU_KERNELS: expected 1, 0 or unset, found 'yes'"),
    (settings.EMULATE_ENV, "yes please", settings.emulate_w8a8, "FP8_BACKEND_EMULATE_W8A8: expected 1, 0 or unset"),
])
def test_bad_values_are_named(clean_env, name, value, read, match):
    clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        read()


def test_no_other_module_reads_the_environment():
    """Behaviour-changing variables are read in settings.py only (the eval / benchmark worker
    modules read their own launch parameters, which are not plugin settings)."""
    allowed = {"vllm_adapter/settings.py", "vllm_adapter/e2e_worker.py"}
    readers = []
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE).as_posix()
        if rel in allowed or rel.startswith(("eval/", "testing/")):
            continue
        if re.search(r"os\.environ\.get|os\.getenv|environ\[", f.read_text()):
            readers.append(rel)
    assert readers == []
