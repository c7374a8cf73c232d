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
from ..formats.scheme import Fp8Scheme
from .layer_owner import check_activation_dtype
from .linear_paths import apply_linear, path_for_device, prepare_layer


#: elements quantized at a time: numerics' elementwise quantization makes fp32 temporaries
#: (~16 bytes per element), which for a whole large layer would raise the load's peak memory
#: above the bf16 model's
CHUNK_ELEMENTS = 1 << 20


def quantize_linear_weight(
    weight: torch.Tensor, strategy: str, logical_widths: list[int], name: str,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 weight [N, K] and its fp32 scale: shape [1] (one tensor scale) or [N].

    Per-tensor quantization of a fused layer (q/k/v, gate/up) gives each shard its own scale,
    as separate layers would have, and keeps all of them exactly as a per-channel vector,
    instead of forcing the whole fused weight onto one scale. The same values as numerics'
    quantize_per_tensor / quantize_per_channel (amax over the whole shard or row, then the
    elementwise quantization), computed a block of rows at a time.
    """
    numerics.check_finite(weight, name)
    if strategy not in ("tensor", "channel"):
        raise ValueError(f"{name}: unsupported weight strategy {strategy!r}")
    widths = logical_widths if strategy == "tensor" and len(logical_widths) > 1 else [weight.shape[0]]
    if sum(widths) != weight.shape[0]:
        raise ValueError(
            f"{name}: shard widths {logical_widths} do not add up to the weight's {weight.shape[0]} rows"
        )
    if strategy == "channel":
        amax = weight.abs().amax(dim=-1, keepdim=True)
        scale = numerics.compute_scale(amax)  # [N, 1]
    else:
        scale = torch.cat([
            numerics.per_tensor_scale(shard).expand(shard.shape[0])
            for shard in torch.split(weight, widths, dim=0)
        ]).reshape(-1, 1)
    q = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    rows = max(1, chunk_elements // max(1, weight.shape[1]))
    for r0 in range(0, weight.shape[0], rows):
        q[r0:r0 + rows] = numerics.quantize_with_scale(weight[r0:r0 + rows], scale[r0:r0 + rows])
    scale = scale.reshape(-1)
    if strategy == "tensor" and len(widths) == 1:
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
            self.scheme.weight_strategy,
            layer.logical_widths,
            f"{self.prefix}.weight",
        )
        layer.weight = torch.nn.Parameter(kernels.w8a16_prepack(q), requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        path = path_for_device(layer.weight.device, self.scheme.weight_strategy, "none")
        prepare_layer(layer, path, self.prefix)  # CPU: unchanged; GPU: W8A8 or repacked W8A16

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return apply_linear(layer, x, bias)
