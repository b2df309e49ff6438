"""Tiny random-initialised Hugging Face models covering every architecture switch jprune handles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

_LLAMA_BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

# Windows shorter than the parity tests' sequences, so sliding layers differ from full ones.
WINDOW = 64
_GEMMA_BASE = dict(
    **_LLAMA_BASE,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=WINDOW,
    hidden_activation="gelu_pytorch_tanh",
    pad_token_id=0,
)

_OPT_BASE = dict(
    vocab_size=96,
    hidden_size=32,
    ffn_dim=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
)


def _configs():
    return {
        "llama-mha": (
            LlamaForCausalLM,
            LlamaConfig(**_LLAMA_BASE, num_key_value_heads=4, tie_word_embeddings=True),
        ),
        "llama3-gqa": (
            LlamaForCausalLM,
            LlamaConfig(
                **{**_LLAMA_BASE, "max_position_embeddings": 1024},
                num_key_value_heads=2,
                head_dim=16,
                tie_word_embeddings=False,
                attention_bias=True,
                mlp_bias=True,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
        ),
        "qwen2": (
            Qwen2ForCausalLM,
            Qwen2Config(**_LLAMA_BASE, num_key_value_heads=2, tie_word_embeddings=False),
        ),
        # per-head q/k norms, explicit head_dim, biases, a full then a sliding layer
        "qwen3": (
            Qwen3ForCausalLM,
            Qwen3Config(
                **_LLAMA_BASE,
                num_key_value_heads=2,
                head_dim=16,
                attention_bias=True,
                use_sliding_window=True,
                sliding_window=WINDOW,
                max_window_layers=1,
                tie_word_embeddings=False,
            ),
        ),
        "mistral": (
            MistralForCausalLM,
            MistralConfig(
                **_LLAMA_BASE,
                num_key_value_heads=2,
                sliding_window=WINDOW,
                tie_word_embeddings=False,
            ),
        ),
        # sliding then full layer, soft-capped scores and logits, query_pre_attn_scalar
        "gemma2": (
            Gemma2ForCausalLM,
            Gemma2Config(
                **_GEMMA_BASE,
                query_pre_attn_scalar=24,
                attn_logit_softcapping=5.0,
                final_logit_softcapping=8.0,
            ),
        ),
        # q/k norms, local RoPE base for sliding layers, linear-scaled global RoPE
        "gemma3": (
            Gemma3ForCausalLM,
            Gemma3TextConfig(
                **_GEMMA_BASE,
                query_pre_attn_scalar=16,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={
                    "full_attention": {
                        "rope_type": "linear",
                        "factor": 8.0,
                        "rope_theta": 1_000_000.0,
                    },
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                },
            ),
        ),
        # fused qkv_proj and gate_up_proj, partial rotary, a window on every layer
        "phi3": (
            Phi3ForCausalLM,
            Phi3Config(
                **_LLAMA_BASE,
                num_key_value_heads=2,
                sliding_window=48,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10_000.0,
                    "partial_rotary_factor": 0.5,
                },
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),
        ),
        # mixtures of experts: 4 experts, 2 per token
        "qwen3-moe": (
            Qwen3MoeForCausalLM,
            Qwen3MoeConfig(
                **_LLAMA_BASE,
                num_key_value_heads=2,
                head_dim=16,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=24,
                norm_topk_prob=False,
                tie_word_embeddings=False,
            ),
        ),
        "mixtral": (
            MixtralForCausalLM,
            MixtralConfig(
                **_LLAMA_BASE,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=2,
                sliding_window=WINDOW,
                tie_word_embeddings=False,
            ),
        ),
        # OPT-125m style (pre-norm) and OPT-350m style (post-norm, project_in/out)
        "opt": (
            OPTForCausalLM,
            OPTConfig(**_OPT_BASE, word_embed_proj_dim=32, do_layer_norm_before=True),
        ),
        "opt-project": (
            OPTForCausalLM,
            OPTConfig(**_OPT_BASE, word_embed_proj_dim=16, do_layer_norm_before=False),
        ),
    }


ARCHITECTURES = tuple(_configs())


def build(name: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised model (all weights, norms and biases perturbed) to
    ``directory``; ``overrides`` change config fields (e.g. ``vocab_size``)."""
    model_cls, config = _configs()[name]
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(
                    0.3 * torch.randn_like(param)
                    if param.dim() == 1
                    else torch.randn_like(param) / param.shape[-1] ** 0.5
                )
    model.save_pretrained(directory)
    return directory


def write_stacked_expert_layout(directory: Path) -> Path:
    """Rewrite a mixture-of-experts checkpoint (``save_pretrained`` writes the hub's one tensor
    per expert) with transformers 5's in-memory names: ``mlp.experts.gate_up_proj`` (experts,
    2 x width, hidden; gate rows first), ``mlp.experts.down_proj`` and ``mlp.gate``."""
    import re

    from safetensors.numpy import load_file, save_file

    roles = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up"}
    roles["down_proj"] = "down"
    pattern = re.compile(r"(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
    experts: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    out = {}
    for name, array in load_file(directory / "model.safetensors").items():
        match = pattern.fullmatch(name)
        if match:
            layer, expert, role = match.groups()
            experts.setdefault(layer, {}).setdefault(int(expert), {})[roles[role]] = array
        else:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = array
    for layer, by_expert in experts.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        out[f"{layer}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([w["gate"], w["up"]]) for w in ordered]
        )
        out[f"{layer}.mlp.experts.down_proj"] = np.stack([w["down"] for w in ordered])
    save_file(out, directory / "model.safetensors", metadata={"format": "pt"})
    return directory
