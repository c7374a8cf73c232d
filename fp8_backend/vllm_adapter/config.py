"""fp8-backend's QuantizationConfig, registered under vLLM's name "fp8"."""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ..formats.checkpoint import (
    CheckpointFormat,
    NotFp8CheckpointError,
    parse_quantization_config,
)
from ..formats.scheme import PER_ROW, PER_TENSOR, Fp8Scheme, Granularity, check_ignore_patterns, match_ignore
from . import settings
from .layer_owner import layer_owner, linear_kind

# A child of vLLM's logger: vLLM configures "vllm" (handler, level, format) in every process.
logger = logging.getLogger("vllm.fp8_backend")

# vLLM's online-quantization shorthands that map onto our weight granularities, for users who pass
# quantization_config={"linear": "fp8_per_channel"} (vLLM's own --quantization-config schema).
_LINEAR_SPEC_TO_WEIGHT = {"fp8_per_tensor": PER_TENSOR, "fp8_per_channel": PER_ROW}


class Fp8Config(QuantizationConfig):
    """FP8 (e4m3) weights for every linear layer but lm_head and the ignore list.

    Checkpoints without a ``quantization_config`` are quantized online while loading;
    vLLM finds this class for them through :meth:`get_config_filenames`.
    """

    def __init__(self, checkpoint: CheckpointFormat | None = None) -> None:
        super().__init__()
        self.checkpoint = checkpoint  # set for FP8 checkpoints: how their tensors are stored
        # online: per-tensor weights, 16-bit activations (user options may change the weights)
        self.scheme = checkpoint.scheme if checkpoint is not None else Fp8Scheme(PER_TENSOR)
        self.ignore: list[str] = []  # online: layers the user leaves 16-bit (lm_head always is)
        self.quantization_config: dict[str, Any] | None = None  # the checkpoint's, as read
        self._logged = False
        self._vllm_config = None  # vLLM's own config for the same checkpoint (layers it serves)
        self._vllm_mappers: list = []
        self._moe_16bit: list[tuple[str, int]] = []  # online: MoE layers ignored (name, experts)
        self._moe_fp8: list[tuple[str, int]] = []  # online: MoE layers quantized (name, experts)
        self._rules_logged: set[str] = set()  # rule sentences already logged
        self.moe_weight: Granularity | None = None  # online experts: None = as the linear layers
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
            return cls()
        checkpoint = parse_quantization_config(config)  # names the bad field on error
        cfg = cls(checkpoint)
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
        linear = getattr(args, "linear", None)
        if linear is not None:
            self.scheme = Fp8Scheme(_weight_from_spec(linear), self.scheme.activation)
        moe = getattr(args, "moe", None)
        if moe is not None:
            # Experts follow the linear layers unless the user names their own granularity.
            self.moe_weight = _weight_from_spec(moe, "moe")
        ignore = list(getattr(args, "ignore", None) or [])
        check_ignore_patterns(ignore, "quantization_config.ignore")
        self.ignore += ignore

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
            rule = self._linear_rule(prefix, self.checkpoint.source)
            if not self._logged:
                logger.info("fp8-backend: %s", self.checkpoint.describe())
                self._logged = True
            if rule.owner == "vllm":
                return self._vllm_linear_method(layer, prefix, rule.reason)
            return Fp8CheckpointLinearMethod(self.checkpoint, prefix, self._stored_zero_points())
        if match_ignore(prefix, self.ignore, self.packed_modules_mapping):
            return UnquantizedLinearMethod()
        rule = self._linear_rule(prefix, "online")
        if rule.owner == "unquantized":
            return UnquantizedLinearMethod()
        if not self._logged:
            logger.info("fp8-backend: %s, quantized online from 16-bit weights", self.scheme.describe())
            self._logged = True
        if rule.owner == "vllm":
            return self._vllm_linear_method(layer, prefix, rule.reason)
        return Fp8OnlineLinearMethod(self.scheme, prefix)

    def _linear_rule(self, prefix: str, fmt: str):
        platform = platform_name()
        return layer_owner(
            linear_kind(prefix), fmt, platform=platform,
            gpu_kernels=settings.gpu_kernels() if platform != "cpu" else False,
        )

    def _vllm_linear_method(self, layer: torch.nn.Module, prefix: str, reason: str) -> QuantizeMethodBase:
        """vLLM's own FP8 linear method for this layer (GPUs): from vLLM's config class for the
        checkpoint's quantization_config, or its online FP8 linear method."""
        self._log_rule_once(reason)
        if self.checkpoint is not None:
            method = self._vllm_own_config().get_quant_method(layer, prefix)
            return method if method is not None else UnquantizedLinearMethod()
        from vllm.model_executor.layers.quantization.online.fp8 import (
            Fp8PerTensorOnlineLinearMethod,
            Fp8PtpcOnlineLinearMethod,
        )

        if self.scheme.weight == PER_ROW:
            return Fp8PtpcOnlineLinearMethod()
        return Fp8PerTensorOnlineLinearMethod()

    def _log_rule_once(self, reason: str) -> None:
        if reason not in self._rules_logged:
            self._rules_logged.add(reason)
            logger.info("fp8-backend: %s", reason)

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
            self._warn_unmatched_ignores()

    def _stored_zero_points(self) -> tuple[str, ...]:
        """The zero-point tensor names ("weight_zero_point", ...) the checkpoint stores (older
        llm-compressor writes them for symmetric schemes): the linear method takes and checks them."""
        from ..formats.layer_tensors import ZERO_POINTS

        stored = self.tensor_names or ()
        return tuple(z for z in ZERO_POINTS if any(n.endswith("." + z) for n in stored))

    def _warn_unmatched_ignores(self) -> None:
        """Ignore patterns of the checkpoint that name no layer it stores: harmless to serving
        (nothing to leave unquantized) but usually a config written for another model. lm_head
        is left out: checkpoints with tied embeddings do not store it."""
        from ..formats.checkpoint import module_names, unmatched_ignores

        if self.checkpoint is None or not self.tensor_names:
            return
        patterns = [p for p in self.checkpoint.ignore if p != "lm_head"]
        names = module_names(self.tensor_names)
        unmatched = unmatched_ignores(patterns, names, self.packed_modules_mapping)
        if unmatched:
            logger.warning(
                "fp8-backend: quantization_config ignore patterns %s match none of the checkpoint's "
                "%d layers (e.g. %s): expected each to name a layer it stores",
                unmatched, len(names), names[:2],
            )

    def _moe_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase:
        """FusedMoE layers, as layer_owner decides: fp8-backend's FP8 MoE method (checkpoints
        and online), vLLM's own method for the same checkpoint, 16-bit experts (ignored layers),
        or a refusal naming the layer."""
        from .layer_owner import UnsupportedLayerError, this_cpu_features
        from .moe import attach_expert_checks, delegated_moe_method, unquantized_moe_method
        from .moe import moe_layer_ignored as _moe_ignored
        from .moe_method import Fp8FusedMoEMethod

        ckpt = self.checkpoint
        if ckpt is not None and (not ckpt.is_quantized(prefix, self.packed_modules_mapping)
                                 or _moe_ignored(layer, prefix, ckpt.ignore, ckpt.source)):
            return unquantized_moe_method(layer, prefix)
        if ckpt is None and _moe_ignored(layer, prefix, self.ignore):
            self._moe_16bit.append((prefix, int(getattr(layer, "global_num_experts", 0) or layer.moe_config.num_experts)))
            return unquantized_moe_method(layer, prefix)
        platform = platform_name()
        moe = layer.moe_config
        activation = getattr(getattr(moe, "activation", None), "value", None)
        rule = layer_owner(
            "moe",
            "online" if ckpt is None else ckpt.source,
            weight=None if ckpt is None else ckpt.scheme.weight,
            platform=platform,
            cpu_features=this_cpu_features() if platform == "cpu" else frozenset(),
            activation=activation,
            has_bias=bool(getattr(moe, "has_bias", False)),
            router_weight_on_input=bool(getattr(layer, "apply_router_weight_on_input", False)),
            moe_choice=settings.moe_choice(),
        )
        if rule.owner == "refuse":
            raise UnsupportedLayerError(f"{prefix}: {rule.reason}")
        if ckpt is not None:
            self._check_expert_count(layer, prefix)
        self._log_rule_once(rule.reason)
        experts = int(getattr(layer, "global_num_experts", 0) or moe.num_experts)
        if ckpt is None:
            self._moe_fp8.append((prefix, experts))
            weight = self.moe_weight or self.scheme.weight
            if rule.owner == "vllm":  # GPUs: vLLM's online FP8 MoE
                from vllm.model_executor.layers.quantization.online.fp8 import (
                    Fp8PerTensorOnlineMoEMethod,
                    Fp8PtpcOnlineMoEMethod,
                )

                cls = Fp8PtpcOnlineMoEMethod if weight == PER_ROW else Fp8PerTensorOnlineMoEMethod
                return cls(moe=moe)
            return Fp8FusedMoEMethod(moe, prefix, online_weight=weight)
        if rule.owner == "vllm":
            return delegated_moe_method(self._vllm_own_config(), layer, prefix, ckpt.source, ckpt.fp8_dtype)
        method = Fp8FusedMoEMethod(moe, prefix, checkpoint=ckpt)
        attach_expert_checks(method, prefix, ckpt.fp8_dtype)
        return method

    def _check_expert_count(self, layer: torch.nn.Module, prefix: str) -> None:
        """The checkpoint's expert tensors against config.json's expert count, by name."""
        if not self.tensor_names:
            return
        from vllm.config import get_current_vllm_config

        from ..formats.moe_tensors import check_expert_indices, expert_count_field

        model_config = get_current_vllm_config().model_config
        hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
        found = expert_count_field(hf) if hf is not None else None
        field, n = found if found else ("num_experts", int(layer.moe_config.num_logical_experts))
        check_expert_indices(prefix, self.tensor_names, n, field)

    def _log_moe_summary(self, prefix: str) -> None:
        """Online FP8: once the model's lm_head is built (after its decoder layers), say how many
        MoE layers and experts are FP8 (and how many stayed 16-bit)."""
        if not prefix.endswith("lm_head"):
            return
        if self._moe_fp8:
            logger.info(
                "fp8-backend: %d mixture-of-experts layers (%d experts) FP8",
                len(self._moe_fp8), sum(n for _, n in self._moe_fp8),
            )
        if self._moe_16bit:
            logger.info(
                "fp8-backend: %d mixture-of-experts layers (%d experts) stay 16-bit",
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

        from ..formats.layer_tensors import KV_SCALE_SUFFIXES

        own = WeightsMapper(orig_to_new_suffix={
            suffix: f".attn.{role}_scale" for suffix, role in KV_SCALE_SUFFIXES if suffix.endswith(".output_scale")
        })
        return own | QuantizationConfig.get_cache_scale_mapper()


def _weight_from_spec(spec: Any, field: str = "linear") -> Granularity:
    """Map vLLM's QuantSpec (or shorthand string) for ``field`` ("linear" or "moe") onto a
    weight granularity (per-tensor / per-channel)."""
    if isinstance(spec, str):
        if spec not in _LINEAR_SPEC_TO_WEIGHT:
            raise ValueError(
                f"quantization_config.{field}: expected one of {sorted(_LINEAR_SPEC_TO_WEIGHT)}, "
                f"found {spec!r}"
            )
        return _LINEAR_SPEC_TO_WEIGHT[spec]
    from vllm.config.quantization import _ONLINE_SHORTHANDS

    for name, weight in _LINEAR_SPEC_TO_WEIGHT.items():
        if getattr(_ONLINE_SHORTHANDS[name], field) == spec:
            return weight
    raise ValueError(
        f"quantization_config.{field}: fp8-backend supports {sorted(_LINEAR_SPEC_TO_WEIGHT)}, "
        f"found {spec}"
    )


def platform_name() -> str:
    """"cpu", "cuda" or vLLM's device name for other platforms."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    return "cuda" if current_platform.is_cuda() else str(current_platform.device_name)


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
        cfg = cls(checkpoint)
        cfg.quantization_config = dict(config)
        # vLLM's Attention reads quant_config.kv_cache_scheme: an FP8 KV cache by default, and
        # per-head scale parameters for strategy "attn_head" (Fp8KVCacheMethod loads both).
        cfg.kv_cache_scheme = config.get("kv_cache_scheme")
        return cfg
