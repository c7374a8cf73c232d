"""Checkpoint conventions, one owner each (imports neither vLLM nor the kernels):

* checkpoint: ``quantization_config`` -> one CheckpointScheme (both on-disk formats), the ignore
  list and config-group targets against layer names;
* layer_tensors: every check of a checkpoint tensor (FP8 weight, weight / input / KV-cache
  scales, zero points), which the vLLM adapter's loaders call as each tensor arrives;
* safetensors_files, kv_scales, moe_tensors: the files, kv_cache_scales.json, expert counts;
* writer: the quantization_config and tensor names the producer writes (parses back equal);
* scheme: the online scheme and ignore-pattern matching.
"""
from .scheme import Fp8Scheme, match_ignore  # noqa: F401
