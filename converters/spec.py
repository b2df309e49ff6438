"""``ModelSpec``: everything jprune's decoder needs to know about an HF causal LM, as data.

LLaMA, Qwen2/3, Mistral, Gemma 2/3, Phi-3 and OPT differ in a handful of switches (norm type
and offset, gated MLP, learned vs rotary positions, which projections carry biases, q/k norms,
norms around the attention and MLP outputs, sliding windows per layer, soft-capping, ...). ``spec_from_hf_config`` reads those switches
from a raw ``config.json`` dict and refuses, by name, any field or value it does not understand:
a converter that guesses builds a silently wrong model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from jprune.errors import JpruneError

# The linears of a decoder block, each with the input ("tap") that feeds it: the one list the
# model, the engine and the methods read.
LINEAR_INPUTS = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "o": "o_in",
    "gate": "mlp_in",
    "up": "mlp_in",
    "down": "down_in",
}


def block_linear_names(spec: ModelSpec) -> tuple[str, ...]:
    """The prunable linears of a block, in forward order (every expert's, in a mixture of
    experts: ``experts.{e}.gate``; the router stays dense)."""
    mlp = ("gate", "up", "down") if spec.gated_mlp else ("up", "down")
    if spec.num_experts:
        mlp = tuple(f"experts.{e}.{r}" for e in range(spec.num_experts) for r in mlp)
    return ("q", "k", "v", "o", *mlp)


def linear_input(role: str) -> str:
    """The tap that feeds linear ``role``: expert ``e``'s linears read ``experts.{e}.mlp_in`` /
    ``experts.{e}.down_in``, the tokens routed to it (zero rows for the others)."""
    if role.startswith("experts."):
        _, expert, name = role.split(".")
        return f"experts.{expert}.{LINEAR_INPUTS[name]}"
    return LINEAR_INPUTS[role]


class UnsupportedModelError(JpruneError):
    """The checkpoint uses an architecture, field or value jprune does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    theta: float
    rope_type: Literal["default", "llama3", "linear"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0  # Phi-3 family: only the first dims of a head rotate

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies in float32, computed the way transformers computes them."""
        dim = self.rotary_dim(head_dim)
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        inv_freq = (1.0 / (np.float32(self.theta) ** exponents)).astype(np.float32)
        if self.rope_type == "default":
            return inv_freq
        if self.rope_type == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band
        # between them interpolated smoothly.
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)


Family = Literal[
    "llama",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mistral",
    "mixtral",
    "gemma2",
    "gemma3_text",
    "phi3",
    "opt",
]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm: Literal["rms", "layer"]
    norm_eps: float
    activation: Literal["silu", "relu", "gelu", "gelu_tanh"]
    gated_mlp: bool  # SwiGLU (gate * up) vs a plain fc1 -> act -> fc2
    norm_before: bool  # pre-norm residual blocks (OPT-350m is post-norm)
    final_norm: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    rope: RopeSpec | None  # None: learned absolute positions (OPT)
    position_offset: int = 0  # OPT's learned table starts 2 rows in
    embed_dim: int = 0  # token-embedding width; != hidden_size means project_in/out (OPT-350m)
    scale_query_before_dot: bool = False  # OPT scales q, not the scores (same math, other rounding)
    norm_offset: float = 0.0  # Gemma stores RMSNorm weights as w - 1: the scale is (1 + w)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before RoPE
    output_norms: bool = False  # Gemma 2/3: a norm on the attention and MLP outputs too
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden), in the weights' dtype
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power (head_dim's)
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    # Per layer: the sliding-window width (a query sees the last `window` keys) or None (all).
    layer_windows: tuple[int | None, ...] = ()
    local_rope: RopeSpec | None = None  # Gemma 3: the RoPE of sliding-window layers
    # Mixture of experts (Qwen3-MoE, Mixtral): every block's MLP is `num_experts` gated MLPs
    # of width `intermediate_size`, each token sent to the `experts_per_token` with the highest
    # router softmax, their outputs summed with those probabilities (renormalised over the
    # chosen ones when `normalize_routing`).
    num_experts: int = 0
    experts_per_token: int = 0
    normalize_routing: bool = False
    # How the checkpoint stores experts: transformers 5's stacked tensors (`fused`) or the
    # hub's one tensor per expert (`per_expert`); a pruned checkpoint is written the same way.
    expert_layout: Literal["fused", "per_expert"] = "fused"

    @property
    def has_projections(self) -> bool:
        return self.embed_dim != self.hidden_size

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def layer_rope(self, layer: int) -> RopeSpec | None:
        if self.local_rope is not None and self.window(layer) is not None:
            return self.local_rope
        return self.rope

    @property
    def default_seqlen(self) -> int:
        return min(self.max_position_embeddings, 2048)


# Fields that describe training, generation, serialization or tooling: they do not change the
# forward pass of a float model, so any value is accepted.
_NEUTRAL_FIELDS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "unk_token_id",
        "mask_token_id",
        "cls_token_id",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "max_length",
        "min_length",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "num_beams",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "initializer_factor",
        "_attn_implementation",
        "attn_implementation",
        "decoder_start_token_id",
        "initializer_range",
        "init_std",
        "use_cache",
        "attention_dropout",
        "dropout",
        "hidden_dropout",
        "activation_dropout",
        "layerdrop",
        "_name_or_path",
        "id2label",
        "label2id",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "quantization_config_applied",
        "cache_implementation",
        "num_labels",
        "_attn_implementation_autoset",
        "use_return_dict",
        "tf_legacy_loss",
        "pruned_heads",
        "torchscript",
        "keys_to_ignore_at_inference",
    }
)

_COMMON_DECODER_FIELDS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "hidden_act",
        "tie_word_embeddings",
    }
)
_GEMMA_FIELDS = (_COMMON_DECODER_FIELDS - {"hidden_act"}) | {
    "hidden_activation",
    "hidden_act",
    "attention_bias",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "use_bidirectional_attention",
}
# `output_router_logits` and `router_aux_loss_coef` only concern training.
_MOE_FIELDS = {
    "num_local_experts",
    "num_experts_per_tok",
    "output_router_logits",
    "router_aux_loss_coef",
}
_QWEN_WINDOW_FIELDS = {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
_FAMILY_FIELDS = {
    "llama": _COMMON_DECODER_FIELDS | {"attention_bias", "mlp_bias", "pretraining_tp"},
    "qwen2": _COMMON_DECODER_FIELDS | _QWEN_WINDOW_FIELDS,
    "qwen3": _COMMON_DECODER_FIELDS | _QWEN_WINDOW_FIELDS | {"attention_bias"},
    "mistral": _COMMON_DECODER_FIELDS | {"sliding_window"},
    "qwen3_moe": _COMMON_DECODER_FIELDS
    | _QWEN_WINDOW_FIELDS
    | _MOE_FIELDS
    | {
        "attention_bias",
        "num_experts",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
    },
    "mixtral": _COMMON_DECODER_FIELDS | _MOE_FIELDS | {"sliding_window", "router_jitter_noise"},
    "gemma2": _GEMMA_FIELDS,
    "gemma3_text": _GEMMA_FIELDS
    | {"rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"},
    # `original_max_position_embeddings` only matters to longrope, which is refused;
    # `auto_map` names the hub's remote code, which transformers' own Phi-3 replaces.
    "phi3": _COMMON_DECODER_FIELDS
    | {
        "sliding_window",
        "original_max_position_embeddings",
        "partial_rotary_factor",
        "resid_pdrop",
        "embd_pdrop",
        "attention_bias",
        "auto_map",
    },
    "opt": frozenset(
        {
            "vocab_size",
            "hidden_size",
            "ffn_dim",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "do_layer_norm_before",
            "_remove_final_layer_norm",
            "word_embed_proj_dim",
            "activation_function",
            "enable_bias",
            "layer_norm_elementwise_affine",
            "tie_word_embeddings",
        }
    ),
}
# Structured pruning with per-layer widths exports a LLaMA whose config lists them
# (``converters/remote_llama.py``, loaded through ``auto_map``); the forward is LLaMA's.
_FAMILY_FIELDS["jprune_llama"] = _FAMILY_FIELDS["llama"] | {
    "intermediate_sizes",
    "v_head_dims",
    "auto_map",
}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "opt": "OPTForCausalLM",
    "jprune_llama": "JpruneLlamaForCausalLM",
}
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    # transformers' tanh approximations of GELU (Gemma's GeGLU)
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
_GEMMA = ("gemma2", "gemma3_text")
_LAYER_TYPES = ("full_attention", "sliding_attention")

SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)


def _require(config: Mapping[str, Any], key: str, family: str) -> Any:
    if config.get(key) is None:
        raise UnsupportedModelError(f"{family} config is missing the field {key!r}")
    return config[key]


def _refuse_unknown_fields(config: Mapping[str, Any], family: str) -> None:
    unknown = sorted(set(config) - _NEUTRAL_FIELDS - _FAMILY_FIELDS[family])
    if unknown:
        raise UnsupportedModelError(
            f"config field {unknown[0]!r} is not handled by jprune's {family} converter"
            + (f" (also: {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
        )


def _activation(name: Any, family: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported for {family}")
    return _ACTIVATIONS[name]


def _rope_from_params(params: dict[str, Any], family: str) -> RopeSpec:
    """One RoPE from a transformers 5 ``rope_parameters`` dict (``rope_theta`` included)."""
    params = dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    theta = float(params.pop("rope_theta"))
    partial = float(params.pop("partial_rotary_factor", 1.0))
    if partial != 1.0 and family != "phi3":
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not handled for {family}")
    if rope_type == "default":
        params.pop("factor", None)  # ignored by the default rope in transformers too
        if params:
            raise UnsupportedModelError(
                f"rope parameter {sorted(params)[0]!r} is not handled for rope_type 'default'"
            )
        return RopeSpec(theta=theta, partial_rotary_factor=partial)
    if rope_type == "linear":
        if set(params) != {"factor"}:
            extra = sorted(set(params) - {"factor"}) or ["factor"]
            raise UnsupportedModelError(
                f"rope parameter {extra[0]!r} is missing or not handled for rope_type 'linear'"
            )
        return RopeSpec(
            theta=theta,
            rope_type="linear",
            factor=float(params["factor"]),
            partial_rotary_factor=partial,
        )
    if rope_type == "llama3":
        known = {
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        }
        extra = sorted(set(params) - known)
        if extra:
            raise UnsupportedModelError(
                f"rope parameter {extra[0]!r} is not handled for rope_type 'llama3'"
            )
        missing = sorted(known - set(params))
        if missing:
            raise UnsupportedModelError(f"llama3 rope is missing {missing[0]!r}")
        return RopeSpec(
            theta=theta,
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            partial_rotary_factor=partial,
        )
    raise UnsupportedModelError(
        f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)"
    )


def _rope_from_config(config: Mapping[str, Any], family: str) -> RopeSpec:
    # transformers 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
    params = dict(config.get("rope_parameters") or {})
    legacy_scaling = config.get("rope_scaling")
    if legacy_scaling:
        params = {**dict(legacy_scaling), **params}
    if "rope_theta" not in params:
        params["rope_theta"] = config.get("rope_theta", 10000.0)
    if "partial_rotary_factor" in config:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    return _rope_from_params(params, family)


def _gemma3_ropes(config: Mapping[str, Any]) -> tuple[RopeSpec, RopeSpec]:
    """Gemma 3's (global, local) RoPEs: per layer type in transformers 5 configs; older ones
    give `rope_theta` (+ `rope_scaling`) for global layers and `rope_local_base_freq`."""
    params = config.get("rope_parameters") or {}
    if set(params) <= set(_LAYER_TYPES) and params:
        ropes = {}
        for kind in _LAYER_TYPES:
            kind_params = dict(params.get(kind) or {"rope_type": "default"})
            kind_params.setdefault(
                "rope_theta", 1_000_000.0 if kind == "full_attention" else 10_000.0
            )
            ropes[kind] = _rope_from_params(kind_params, "gemma3_text")
        return ropes["full_attention"], ropes["sliding_attention"]
    global_params = {"rope_theta": config.get("rope_theta", 1_000_000.0)}
    global_params |= dict(config.get("rope_scaling") or {}) | dict(params)
    local = {"rope_theta": config.get("rope_local_base_freq", 10_000.0)}
    return _rope_from_params(global_params, "gemma3_text"), _rope_from_params(local, "gemma3_text")


def _default_layer_types(config: Mapping[str, Any], family: str, layers: int) -> list[str]:
    """``layer_types`` as transformers derives it when a config does not list it."""
    if family == "gemma2":
        return [_LAYER_TYPES[(i + 1) % 2] for i in range(layers)]
    if family == "gemma3_text":
        pattern = int(
            config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
        )
        return [_LAYER_TYPES[bool((i + 1) % pattern)] for i in range(layers)]
    if family in ("qwen2", "qwen3"):
        first_sliding = int(config.get("max_window_layers") or 0)
        return [_LAYER_TYPES[i >= first_sliding] for i in range(layers)]
    # Mistral, Mixtral, Qwen3-MoE and Phi-3 slide every layer when they have a window.
    return [_LAYER_TYPES[1]] * layers


def _layer_windows(config: Mapping[str, Any], family: str, layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if family in ("qwen2", "qwen3", "qwen3_moe") and not config.get("use_sliding_window"):
        window = None  # transformers drops the window unless use_sliding_window is set
    if family in _GEMMA and config.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention=true is not supported")
    types = config.get("layer_types")
    if family in ("mistral", "mixtral", "qwen3_moe", "phi3") or types is None:
        types = _default_layer_types(config, family, layers)
    if (
        not isinstance(types, list)
        or len(types) != layers
        or any(t not in _LAYER_TYPES for t in types)
    ):
        raise UnsupportedModelError(
            f"layer_types must list {layers} of {', '.join(_LAYER_TYPES)}, got {types!r}"
        )
    if window is None:
        if family in _GEMMA and "sliding_attention" in types:
            raise UnsupportedModelError(f"{family} sliding_attention layers need a sliding_window")
        return ()
    if not isinstance(window, int) or window < 1:
        raise UnsupportedModelError(f"sliding_window must be a positive integer, got {window!r}")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _experts(config: Mapping[str, Any], family: str, layers: int) -> dict[str, Any]:
    """The mixture-of-experts fields of a Qwen3-MoE or Mixtral config (nothing otherwise)."""
    if family not in ("qwen3_moe", "mixtral"):
        return {}
    experts = config.get("num_local_experts", config.get("num_experts"))
    if experts is None:
        raise UnsupportedModelError(f"{family} config is missing the field 'num_local_experts'")
    chosen = int(_require(config, "num_experts_per_tok", family))
    if not 0 < chosen <= int(experts):
        raise UnsupportedModelError(
            f"num_experts_per_tok={chosen} must be between 1 and the {experts} experts"
        )
    if family == "mixtral":
        return {
            "num_experts": int(experts),
            "experts_per_token": chosen,
            "normalize_routing": True,
        }
    # Qwen3-MoE can keep dense MLPs in some layers; jprune's blocks are all alike.
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
        raise UnsupportedModelError(
            "qwen3_moe with dense layers (mlp_only_layers / decoder_sparse_step != 1) is "
            "not supported"
        )
    return {
        "num_experts": int(experts),
        "experts_per_token": chosen,
        "normalize_routing": bool(config.get("norm_topk_prob", False)),
        "intermediate_size": int(_require(config, "moe_intermediate_size", family)),
    }


def _rope_decoder_spec(config: Mapping[str, Any], family: str) -> ModelSpec:
    """LLaMA and the families built like it: pre-norm RMSNorm blocks, RoPE, a gated MLP."""
    hidden = int(_require(config, "hidden_size", family))
    heads = int(_require(config, "num_attention_heads", family))
    layers = int(_require(config, "num_hidden_layers", family))
    head_dim = int(config.get("head_dim") or hidden // heads)
    attention_bias = bool(config.get("attention_bias", False))
    qkv_bias = o_bias = attention_bias
    mlp_bias = False
    if family == "llama":
        if int(config.get("pretraining_tp", 1)) != 1:
            raise UnsupportedModelError("pretraining_tp != 1 is not supported")
        mlp_bias = bool(config.get("mlp_bias", False))
    elif family == "qwen2":
        qkv_bias, o_bias = True, False
    elif family in ("mistral", "mixtral", "phi3"):
        qkv_bias = o_bias = False  # their attention ignores `attention_bias`
    moe = _experts(config, family, layers)
    intermediate = moe.pop("intermediate_size", None) or int(
        _require(config, "intermediate_size", family)
    )
    gemma = family in _GEMMA
    if gemma:
        act = config.get("hidden_activation") or config.get("hidden_act")
        if config.get("hidden_act") not in (None, act):
            raise UnsupportedModelError(
                f"hidden_act {config['hidden_act']!r} differs from hidden_activation {act!r}"
            )
    else:
        act = config.get("hidden_act", "silu")
    if family == "gemma3_text":
        rope, local_rope = _gemma3_ropes(config)
    else:
        rope, local_rope = _rope_from_config(config, family), None
    softcaps = {}
    if gemma:
        softcaps = {
            key: None if config.get(field) is None else float(config[field])
            for key, field in (
                ("attn_softcap", "attn_logit_softcapping"),
                ("final_softcap", "final_logit_softcapping"),
            )
        }
    return ModelSpec(
        family=family,  # type: ignore[arg-type]
        vocab_size=int(_require(config, "vocab_size", family)),
        hidden_size=hidden,
        intermediate_size=intermediate,
        **moe,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(_require(config, "max_position_embeddings", family)),
        norm="rms",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        activation=_activation(act, family),  # type: ignore[arg-type]
        gated_mlp=True,
        norm_before=True,
        final_norm=True,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        tie_embeddings=bool(config.get("tie_word_embeddings", gemma)),
        rope=rope,
        embed_dim=hidden,
        norm_offset=1.0 if gemma else 0.0,
        qk_norm=family in ("qwen3", "qwen3_moe", "gemma3_text"),
        output_norms=gemma,
        embed_scale=gemma,
        query_pre_attn_scalar=(
            float(_require(config, "query_pre_attn_scalar", family)) if gemma else None
        ),
        layer_windows=_layer_windows(config, family, layers),
        local_rope=local_rope,
        **softcaps,
    )


def _opt_spec(config: Mapping[str, Any]) -> ModelSpec:
    hidden = int(_require(config, "hidden_size", "opt"))
    heads = int(_require(config, "num_attention_heads", "opt"))
    if not config.get("layer_norm_elementwise_affine", True):
        raise UnsupportedModelError("opt layer_norm_elementwise_affine=false is not supported")
    norm_before = bool(config.get("do_layer_norm_before", True))
    bias = bool(config.get("enable_bias", True))
    return ModelSpec(
        family="opt",
        vocab_size=int(_require(config, "vocab_size", "opt")),
        hidden_size=hidden,
        intermediate_size=int(_require(config, "ffn_dim", "opt")),
        num_layers=int(_require(config, "num_hidden_layers", "opt")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(_require(config, "max_position_embeddings", "opt")),
        norm="layer",
        norm_eps=1e-5,
        activation=_activation(config.get("activation_function", "relu"), "opt"),  # type: ignore[arg-type]
        gated_mlp=False,
        norm_before=norm_before,
        final_norm=norm_before and not config.get("_remove_final_layer_norm", False),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        rope=None,
        position_offset=2,
        embed_dim=int(config.get("word_embed_proj_dim") or hidden),
        scale_query_before_dot=True,
    )


def _check_layer_widths(config: Mapping[str, Any], num_layers: int) -> None:
    for key in ("intermediate_sizes", "v_head_dims"):
        widths = config.get(key)
        if widths is None:
            raise UnsupportedModelError(f"jprune_llama config is missing the field {key!r}")
        if (
            not isinstance(widths, list)
            or len(widths) != num_layers
            or not all(isinstance(w, int) and w > 0 for w in widths)
        ):
            raise UnsupportedModelError(
                f"jprune_llama {key} must list {num_layers} positive integers, got {widths!r}"
            )


def layer_widths(config: Mapping[str, Any], spec: ModelSpec) -> dict[str, list[int]]:
    """Per-layer MLP width and value-head width the config promises (stock: uniform)."""
    if "intermediate_sizes" in config:
        return {
            "intermediate": list(config["intermediate_sizes"]),
            "v_head": list(config["v_head_dims"]),
        }
    return {
        "intermediate": [spec.intermediate_size] * spec.num_layers,
        "v_head": [spec.head_dim] * spec.num_layers,
    }


def spec_from_hf_config(config: Mapping[str, Any]) -> ModelSpec:
    """Read a raw ``config.json`` dict; refuse anything that would change the forward pass."""
    family = config.get("model_type")
    if family not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {family!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    for arch in config.get("architectures") or []:
        if arch != _ARCHITECTURES[family]:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported (expected {_ARCHITECTURES[family]})"
            )
    _refuse_unknown_fields(config, family)
    if family == "jprune_llama":
        spec = _rope_decoder_spec(config, "llama")
        _check_layer_widths(config, spec.num_layers)
    elif family == "opt":
        spec = _opt_spec(config)
    else:
        spec = _rope_decoder_spec(config, family)
    if spec.num_heads % spec.num_kv_heads:
        raise UnsupportedModelError(
            f"num_attention_heads={spec.num_heads} is not a multiple of num_key_value_heads={spec.num_kv_heads}"
        )
    return spec
