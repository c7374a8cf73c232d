"""Property-based checks of the checkpoint parser and validators alone (no engine): whatever a
config or tensor holds, the answer is a parsed scheme / a checked tensor, or a
CheckpointFormatError / NotFp8CheckpointError naming where the problem is — never another
exception (KeyError, TypeError, AttributeError, ...) and never a silently accepted bad scale."""

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_formats import AUTOFP8_DYNAMIC, AUTOFP8_STATIC_KV, CT_FP8, CT_FP8_BLOCK, CT_FP8_DYNAMIC
from schemes import WEIGHTS

from fp8_backend.formats.checkpoint import (
    CheckpointFormatError,
    CheckpointFormat,
    NotFp8CheckpointError,
    parse_quantization_config,
)
from fp8_backend.formats.layer_tensors import check_scale, validate_kv_scale, validate_layer_tensors
from fp8_backend.formats.scheme import Fp8Scheme

VALID = [AUTOFP8_DYNAMIC, AUTOFP8_STATIC_KV, CT_FP8, CT_FP8_BLOCK, CT_FP8_DYNAMIC]

# Values a JSON config can hold, including the wrong kinds for every field.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True)
    | st.sampled_from(["fp8", "compressed-tensors", "float", "int", "tensor", "channel", "block",
                       "token", "group", "static", "dynamic", "e4m3", "float-quantized", "Linear",
                       "lm_head", "re:.*", "re:(", "", "attn_head"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _paths(d, prefix=()):
    """Every (path, container) pair of a nested config."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))


@st.composite
def mutated_configs(draw):
    cfg = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(cfg))
        path = draw(st.sampled_from(paths))
        parent = cfg
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(json_values)
    return cfg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_configs())
def test_parser_answers_every_config(cfg):
    try:
        s = parse_quantization_config(cfg)
    except NotFp8CheckpointError as e:
        assert "not an FP8 checkpoint" in str(e)
    except CheckpointFormatError as e:
        assert str(e).startswith(("quantization_config", "CheckpointFormat.")), str(e)
        assert "expected" in str(e) or "found" in str(e), str(e)
    else:
        assert isinstance(s, CheckpointFormat)


scale_dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                torch.int32, torch.uint8, torch.float8_e4m3fn, torch.bool])
scale_values = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=300, deadline=None)
@given(scale_dtypes, st.lists(scale_values, min_size=0, max_size=5), st.sampled_from([(), (-1,), (-1, 1)]))
def test_scale_check_never_lets_a_bad_scale_through(dtype, values, shape):
    t = torch.tensor(values if values else [1.0], dtype=torch.float32)
    t = t.reshape(shape) if shape != () and t.numel() else (t[0] if t.numel() else t)
    t = t.to(dtype)
    try:
        s = check_scale("x.weight_scale", t)
    except CheckpointFormatError as e:
        assert str(e).startswith("x.weight_scale: expected"), str(e)
        return
    assert dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    assert s.dtype == torch.float32 and bool(torch.isfinite(s).all()) and bool((s > 0).all())


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 4), st.sampled_from([None, 1, 2, 4]), scale_values)
def test_kv_scale_shapes(numel, heads, value):
    from fp8_backend.formats.checkpoint import KVCacheScheme

    for kv in (None, KVCacheScheme("tensor"), KVCacheScheme("head")):
        t = torch.full((numel,), value)
        try:
            s = validate_kv_scale("l.k_scale", t, kv, heads)
        except CheckpointFormatError as e:
            assert str(e).startswith("l.k_scale: expected"), str(e)
            continue
        assert bool(torch.isfinite(s).all() and (s > 0).all())
        # Per-head scales: one per kv head, or any count when the head count is not known.
        assert s.numel() == 1 or (kv is not None and kv.strategy == "head" and heads in (None, s.numel()))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from(["tensor", "channel", "block"]),
       st.sampled_from([(), (1,), "N", "N1", "grid", "grid+1"]))
def test_layer_tensor_shapes(n, k, strategy, scale_shape):
    import math

    scheme = CheckpointFormat(source="fp8", storage_format="fp8", scheme=Fp8Scheme(WEIGHTS[strategy]))
    shape = {"N": (n,), "N1": (n, 1), "grid": (math.ceil(n / 128), math.ceil(k / 128)),
             "grid+1": (math.ceil(n / 128) + 1, math.ceil(k / 128))}.get(scale_shape, scale_shape)
    tensors = {"weight": torch.zeros(n, k, dtype=torch.float8_e4m3fn), "weight_scale": torch.ones(shape)}
    if strategy == "block":
        tensors["weight_scale_inv"] = tensors.pop("weight_scale")
        scheme = CheckpointFormat(source="fp8", storage_format="fp8", scheme=Fp8Scheme(WEIGHTS["block"]),
                                  weight_scale_name="weight_scale_inv")
    try:
        lt = validate_layer_tensors("m.l", tensors, scheme)
    except CheckpointFormatError as e:
        assert str(e).startswith("m.l.weight_scale"), str(e)
        return
    assert tuple(lt.weight_scale.shape) in ((1, 1), (n, 1), (math.ceil(n / 128), math.ceil(k / 128)))
