"""fp8-backend's QuantizationConfig, registered under vLLM's name "fp8"."""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ..formats.checkpoint import (
    CheckpointScheme,
    NotFp8CheckpointError,
    parse_quantization_config,
)
from ..formats.scheme import Fp8Scheme, match_ignore
from .layer_owner import layer_owner, linear_kind

# A child of vLLM's logger: vLLM configures "vllm" (handler, level, format) in every process.
logger = logging.getLogger("vllm.fp8_backend")

# vLLM's online-quantization shorthands that map onto our weight strategies, for users who pass
# quantization_config={"linear": "fp8_per_channel"} (vLLM's own --quantization-config schema).
_LINEAR_SPEC_TO_STRATEGY = {"fp8_per_tensor": "tensor", "fp8_per_channel": "channel"}


class Fp8Config(QuantizationConfig):
    """FP8 (e4m3) weights for every linear layer but lm_head and the ignore list.

    Checkpoints without a ``quantization_config`` are quantized online while loading;
    vLLM finds this class for them through :meth:`get_config_filenames`.
    """

    def __init__(self, scheme: Fp8Scheme | None = None, checkpoint: CheckpointScheme | None = None) -> None:
        super().__init__()
        self.scheme = scheme or Fp8Scheme()
        self.checkpoint = checkpoint  # set for FP8 checkpoints: how their tensors are stored
        self.quantization_config: dict[str, Any] | None = None  # the checkpoint's, as read
        self._logged = False
        self._vllm_config = None  # vLLM's own config for the same checkpoint (layers it serves)
        self._vllm_mappers: list = []
        self._moe_16bit: list[tuple[str, int]] = []  # online: MoE layers left 16-bit (name, experts)
        self.tensor_names: frozenset[str] | None = None  # every tensor the checkpoint stores

    # -- vLLM's QuantizationConfig interface ----------------------------------------------------

    @classmethod
    def get_name(cls) -> str:
        return "fp8"

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # fp32 activations are refused by vLLM at engine start with this list in the message.
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        # Only consulted on GPUs; Ampere (sm_80) is the oldest with a planned path.
        return 80

    @classmethod
    def get_config_filenames(cls) -> list[str]:
        # For a checkpoint WITHOUT quantization_config, vLLM's get_quant_config hands an "fp8"
        # request to its built-in online method (which does not run on CPU) unless the config
        # class names a file to read. The model's own config.json always exists: vLLM matches
        # names with str.endswith, so "/config.json" selects exactly it (not tokenizer_config.json
        # or generation_config.json), and from_config then receives the model config, which has
        # no "quant_method": that is how from_config knows to quantize online.
        return ["/config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        if "quant_method" not in config:
            return cls(Fp8Scheme(online=True))
        checkpoint = parse_quantization_config(config)  # names the bad field on error
        cfg = cls(Fp8Scheme(online=False, ignore=list(checkpoint.ignore)), checkpoint)
        cfg.quantization_config = dict(config)
        return cfg

    # vLLM attaches the user's --quantization-config (QuantizationConfigArgs) to the checkpoint
    # config as an OnlineQuantizationConfig, which would route layers to vLLM's own online
    # methods. Take the options it carries for ourselves instead and hand vLLM None.
    @property
    def online_quantization_config(self):  # type: ignore[override]
        return None

    @online_quantization_config.setter
    def online_quantization_config(self, online_cfg) -> None:
        if online_cfg is None:
            return
        args = getattr(online_cfg, "args", online_cfg)
        self.apply_user_options(args)

    def apply_user_options(self, args: Any) -> None:
        """Honor vLLM's quantization_config schema: ``linear`` (fp8_per_tensor |
        fp8_per_channel) and ``ignore``. Anything else is refused by name."""
        if getattr(args, "targets", None):
            raise ValueError("quantization_config.targets: not supported by fp8-backend; use 'ignore'")
        if getattr(args, "moe", None) is not None and getattr(args, "linear", None) is None:
            raise ValueError(
                "quantization_config.moe: online FP8 of mixture-of-experts layers is not "
                "implemented in fp8-backend yet (with quantization='fp8' the experts stay 16-bit)"
            )
        linear = getattr(args, "linear", None)
        strategy = self.scheme.weight_strategy
        if linear is not None:
            strategy = _strategy_from_spec(linear)
        ignore = list(getattr(args, "ignore", None) or [])
        self.scheme = Fp8Scheme(
            weight_strategy=strategy,
            activation_scheme=self.scheme.activation_scheme,
            online=self.scheme.online,
            ignore=self.scheme.ignore + ignore,
        )

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from .checkpoint_linear import Fp8CheckpointLinearMethod
        from .linear import Fp8OnlineLinearMethod

        from vllm.model_executor.layers.attention import Attention

        from vllm.model_executor.layers.fused_moe import RoutedExperts

        self._check_files_once()
        if isinstance(layer, Attention):
            return self._kv_cache_method(layer)
        if isinstance(layer, RoutedExperts):
            return self._moe_method(layer, prefix)
        if not isinstance(layer, LinearBase):
            self._log_moe_summary(prefix)
            return None  # lm_head (ParallelLMHead) and embeddings stay 16-bit
        if self.checkpoint is not None:
            if not self.checkpoint.is_quantized(prefix, self.packed_modules_mapping):
                return UnquantizedLinearMethod()
            if not self._logged:
                logger.info("fp8-backend: %s", self.checkpoint.describe())
                self._logged = True
            return Fp8CheckpointLinearMethod(self.checkpoint, prefix)
        if match_ignore(prefix, self.scheme.ignore, self.packed_modules_mapping):
            return UnquantizedLinearMethod()
        if layer_owner(linear_kind(prefix), "online").owner == "unquantized":
            return UnquantizedLinearMethod()
        if not self._logged:
            logger.info("fp8-backend: %s", self.scheme.describe())
            self._logged = True
        return Fp8OnlineLinearMethod(self.scheme, prefix)

    def _check_files_once(self) -> None:
        """The model directory's safetensors files, checked before vLLM reads any tensor, so a
        truncated or corrupt shard is named (safetensors' own error names no file)."""
        if getattr(self, "_files_checked", False):
            return
        self._files_checked = True
        import os

        from vllm.config import get_current_vllm_config

        from ..formats.safetensors_files import check_safetensors_files

        model_config = get_current_vllm_config().model_config
        model = getattr(model_config, "model", None)
        if model and os.path.isdir(model) and getattr(model_config, "quantization", None):
            # Kept: the KV-scale method tells a deprecated kv_scale from a lost v_scale by it.
            self.tensor_names = frozenset(check_safetensors_files(model))

    def _moe_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase:
        """FusedMoE layers, as layer_owner decides: vLLM's own method for the same checkpoint,
        16-bit experts (online FP8 and ignored layers), or a refusal naming the layer."""
        from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
        from vllm.platforms import current_platform

        from .layer_owner import this_cpu_features
        from .layer_owner import UnsupportedLayerError
        from .moe import delegated_moe_method

        ckpt = self.checkpoint
        if ckpt is not None and not ckpt.is_quantized(prefix, self.packed_modules_mapping):
            return UnquantizedFusedMoEMethod(layer.moe_config)
        if ckpt is None and match_ignore(prefix, self.scheme.ignore, self.packed_modules_mapping):
            return UnquantizedFusedMoEMethod(layer.moe_config)
        platform = "cpu" if current_platform.is_cpu() else ("cuda" if current_platform.is_cuda() else current_platform.device_name)
        activation = getattr(getattr(layer.moe_config, "activation", None), "value", None)
        rule = layer_owner(
            "moe",
            "online" if ckpt is None else ckpt.source,
            weight_strategy=None if ckpt is None else ckpt.weight_strategy,
            block_size=None if ckpt is None else ckpt.block_size,
            platform=platform,
            cpu_features=this_cpu_features() if platform == "cpu" else frozenset(),
            activation=activation,
        )
        if rule.owner == "refuse":
            raise UnsupportedLayerError(f"{prefix}: {rule.reason}")
        if rule.owner == "unquantized":
            experts = int(getattr(layer, "global_num_experts", 0) or layer.moe_config.num_experts)
            if not self._moe_16bit:
                logger.info("fp8-backend: %s: %s", prefix, rule.reason)
            self._moe_16bit.append((prefix, experts))
            return UnquantizedFusedMoEMethod(layer.moe_config)
        logger.info("fp8-backend: %s: %s", prefix, rule.reason)
        return delegated_moe_method(self._vllm_own_config(), layer, prefix, ckpt.source, ckpt.fp8_dtype)

    def _log_moe_summary(self, prefix: str) -> None:
        """Online FP8: once the model's lm_head is built (after its decoder layers), say how many
        MoE layers and experts stayed 16-bit."""
        if self._moe_16bit and prefix.endswith("lm_head"):
            logger.info(
                "fp8-backend: %d mixture-of-experts layers (%d experts) stay 16-bit; the other "
                "linear layers are FP8",
                len(self._moe_16bit), sum(n for _, n in self._moe_16bit),
            )

    def _vllm_own_config(self) -> QuantizationConfig:
        """vLLM's own config class for this checkpoint's quantization_config (built once)."""
        from .moe import vllm_config_for

        if self._vllm_config is None:
            cfg = vllm_config_for(self.checkpoint.source, self.quantization_config or {})
            cfg.packed_modules_mapping = self.packed_modules_mapping
            for mapper in self._vllm_mappers:
                cfg.apply_vllm_mapper(mapper)
            self._vllm_config = cfg
        return self._vllm_config

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # Kept for vLLM's own config, built only if a layer is delegated to it.
        self._vllm_mappers.append(hf_to_vllm_mapper)
        if self._vllm_config is not None:
            self._vllm_config.apply_vllm_mapper(hf_to_vllm_mapper)

    def _kv_cache_method(self, layer: torch.nn.Module) -> QuantizeMethodBase | None:
        """k/v scales for attention layers (Fp8KVCacheMethod). vLLM refuses fp8_e5m2 with any
        fp8 scale-loading method, so an e5m2 cache with no scales declared keeps the defaults."""
        from .kv_cache import Fp8KVCacheMethod

        declared = self.checkpoint is not None and self.checkpoint.kv_cache is not None
        if getattr(layer, "kv_cache_dtype", None) == "fp8_e5m2" and not declared:
            return None
        return Fp8KVCacheMethod(self)

    def get_cache_scale_mapper(self):
        """AutoFP8's k_proj/v_proj.output_scale -> attn.k_scale/v_scale, plus vLLM's own names
        (self_attn.k_scale, deprecated kv_scale, ...)."""
        from vllm.model_executor.models.utils import WeightsMapper

        own = WeightsMapper(orig_to_new_suffix={
            ".k_proj.output_scale": ".attn.k_scale",
            ".v_proj.output_scale": ".attn.v_scale",
        })
        return own | QuantizationConfig.get_cache_scale_mapper()


def _strategy_from_spec(linear: Any) -> str:
    """Map vLLM's QuantSpec (or shorthand string) onto "tensor" / "channel"."""
    if isinstance(linear, str):
        if linear not in _LINEAR_SPEC_TO_STRATEGY:
            raise ValueError(
                f"quantization_config.linear: expected one of {sorted(_LINEAR_SPEC_TO_STRATEGY)}, "
                f"found {linear!r}"
            )
        return _LINEAR_SPEC_TO_STRATEGY[linear]
    from vllm.config.quantization import _ONLINE_SHORTHANDS

    for name, strategy in _LINEAR_SPEC_TO_STRATEGY.items():
        if _ONLINE_SHORTHANDS[name].linear == linear:
            return strategy
    raise ValueError(
        f"quantization_config.linear: fp8-backend supports {sorted(_LINEAR_SPEC_TO_STRATEGY)}, "
        f"found {linear}"
    )


class Fp8CompressedTensorsConfig(Fp8Config):
    """FP8 checkpoints in the compressed-tensors format (llm-compressor's FP8, FP8_DYNAMIC).

    Registered under the custom name "fp8_backend": vLLM asks every custom config first whether
    it overrides a checkpoint's quant_method (``override_quantization_method``), so FP8
    compressed-tensors checkpoints come here instead of to vLLM's compressed-tensors path, which
    does not run FP8 on this CPU. Every other compressed-tensors scheme stays with vLLM.
    """

    @classmethod
    def get_name(cls) -> str:
        return "fp8_backend"

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        if not isinstance(hf_quant_cfg, dict) or hf_quant_cfg.get("quant_method") != "compressed-tensors":
            return None
        if user_quant not in (None, "compressed-tensors", "fp8", "fp8_backend"):
            return None  # the user asked for another method by name: let vLLM decide
        try:
            parse_quantization_config(hf_quant_cfg)
        except NotFp8CheckpointError as e:
            from vllm.platforms import current_platform

            from .layer_owner import UnsupportedLayerError, non_fp8_scheme_owner

            rule = non_fp8_scheme_owner(e.weight_kinds, "cpu" if current_platform.is_cpu() else "gpu")
            if rule.owner == "refuse":
                raise UnsupportedLayerError(f"quantization_config.config_groups: {rule.reason}") from None
            logger.info("fp8-backend: %s", e)
            return None
        # A malformed FP8 config raises CheckpointFormatError here, naming the field.
        return cls.get_name()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        checkpoint = parse_quantization_config(config)
        cfg = cls(Fp8Scheme(online=False, ignore=list(checkpoint.ignore)), checkpoint)
        cfg.quantization_config = dict(config)
        # vLLM's Attention reads quant_config.kv_cache_scheme: an FP8 KV cache by default, and
        # per-head scale parameters for strategy "attn_head" (Fp8KVCacheMethod loads both).
        cfg.kv_cache_scheme = config.get("kv_cache_scheme")
        return cfg
