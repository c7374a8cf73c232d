"""Checkpoint conventions, one owner each (imports neither vLLM nor the kernels):

* scheme: the one scheme model (Fp8Scheme: weight / activation scale granularity as block
  shapes) and ignore-pattern matching;
* checkpoint: ``quantization_config`` -> one CheckpointFormat (both on-disk formats), the ignore
  list and config-group targets against layer names;
* layer_tensors: every check of a checkpoint tensor (FP8 weight, weight / input / KV-cache
  scales, zero points), which the vLLM adapter's loaders call as each tensor arrives;
* safetensors_files, kv_scales, moe_tensors: the files, kv_cache_scales.json, expert counts;
* writer: the quantization_config and tensor names the producer writes (parses back equal).
"""
from .scheme import PER_ROW, PER_TENSOR, ActivationQuant, Fp8Scheme, Granularity, blocks, match_ignore  # noqa: F401
