"""Linear methods: 16-bit weights quantized to FP8 as they load, W8A16 kernel at run time."""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.model_loader.reload.layerwise import initialize_online_processing
from vllm.model_executor.parameter import ModelWeightParameter

from .. import kernels, numerics
from ..formats.scheme import PER_TENSOR, Fp8Scheme, Granularity
from .layer_owner import check_activation_dtype
from .linear_paths import apply_linear, path_for_device, prepare_layer


#: elements quantized at a time: numerics' elementwise quantization makes fp32 temporaries
#: (~16 bytes per element), which for a whole large layer would raise the load's peak memory
#: above the bf16 model's
CHUNK_ELEMENTS = 1 << 20


def quantize_linear_weight(
    weight: torch.Tensor, granularity: Granularity, logical_widths: list[int], name: str,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weight [N, K] and its fp32 scale: shape [1] (one tensor scale) or [N].

    ``granularity`` must span whole rows (per-tensor, per-channel). A fused layer (q/k/v,
    gate/up) is quantized shard by shard, as separate layers would be: per-tensor gives each
    shard its own scale, kept exactly as a per-channel vector, instead of forcing the whole fused
    weight onto one scale. The same values as numerics' block quantization (amax per block, then
    the elementwise quantization), computed a chunk of rows at a time.
    """
    numerics.check_finite(weight, name)
    if not granularity.whole_rows:
        raise ValueError(f"{name}: online FP8 quantizes per tensor or per channel, found {granularity.words()} scales")
    n, k = weight.shape
    widths = logical_widths if len(logical_widths) > 1 else [n]
    if sum(widths) != n:
        raise ValueError(f"{name}: shard widths {logical_widths} do not add up to the weight's {n} rows")
    rows = max(1, chunk_elements // max(1, k))
    # a block of whole rows has the amax of its rows' amaxes
    row_amax = torch.cat([weight[r0:r0 + rows].abs().amax(dim=-1, keepdim=True)
                          for r0 in range(0, n, rows)]).float() if n else weight.new_zeros((0, 1), dtype=torch.float32)
    scales = []
    for shard in torch.split(row_amax, widths, dim=0):
        bn = granularity.block((shard.shape[0], k))[0]
        grid = numerics.compute_scale(numerics.block_amax(shard, (bn, 1)))
        scales.append(grid.repeat_interleave(bn, 0)[: shard.shape[0]])
    scale = torch.cat(scales)  # [N, 1]
    q = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    for r0 in range(0, n, rows):
        q[r0:r0 + rows] = numerics.quantize_with_scale(weight[r0:r0 + rows], scale[r0:r0 + rows])
    scale = scale.reshape(-1)
    if granularity == PER_TENSOR and len(widths) == 1:
        scale = scale[:1].clone()
    return q, scale.contiguous()


@register_weight_loader_v2_supported_method
class Fp8OnlineLinearMethod(LinearMethodBase):
    """Online FP8: the 16-bit weight is declared on the meta device and each layer is quantized
    as soon as all of its shards have arrived (vLLM's layerwise online-processing loader), so the
    full-precision model is never resident at once."""

    uses_meta_device: bool = True

    def __init__(self, scheme: Fp8Scheme, prefix: str = "") -> None:
        self.scheme = scheme
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        check_activation_dtype(self.prefix, params_dtype)
        layer.logical_widths = list(output_partition_sizes)
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = sum(output_partition_sizes)
        layer.orig_dtype = params_dtype
        weight = ModelWeightParameter(
            data=torch.empty(
                layer.output_size_per_partition,
                input_size_per_partition,
                device="meta",  # materialized by the layerwise loader, then quantized
                dtype=params_dtype,
            ),
            input_dim=1,
            output_dim=0,
            weight_loader=extra_weight_attrs.get("weight_loader"),
        )
        layer.register_parameter("weight", weight)
        initialize_online_processing(layer)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.weight.dtype == torch.float8_e4m3fn or hasattr(layer, "fp8_path"):
            return  # already quantized (processing can be requested twice on reload)
        q, scale = quantize_linear_weight(
            layer.weight.data,
            self.scheme.weight,
            layer.logical_widths,
            f"{self.prefix}.weight",
        )
        layer.weight = torch.nn.Parameter(kernels.w8a16_prepack(q), requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        path = path_for_device(layer.weight.device, self.scheme)
        prepare_layer(layer, path, self.prefix)  # CPU: unchanged; GPU: W8A8 or repacked W8A16

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_linear(layer, x, bias)
