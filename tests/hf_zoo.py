"""Tiny random-initialised Hugging Face models covering every architecture switch jprune handles."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
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


def build(name: str, directory: Path, seed: int = 0) -> Path:
    """Save a randomly initialised model (all weights, norms and biases perturbed) to ``directory``."""
    model_cls, config = _configs()[name]
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
