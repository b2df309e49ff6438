"""A LLaMA whose layers have their own MLP width and value-head width (structured pruning).

jprune writes this file, unchanged, beside a structurally pruned checkpoint as
``modeling_jprune_llama.py`` and points ``config.json``'s ``auto_map`` at it, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it. It imports only
torch and transformers. The config adds two lists to ``LlamaConfig``:

* ``intermediate_sizes[i]``: rows of gate/up and columns of down in layer ``i``;
* ``v_head_dims[i]``: per-head width of v in layer ``i`` (o reads ``num_heads * v_head_dims[i]``);
  q and k keep ``head_dim``, so the attention scores and rotary embedding are LLaMA's.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama


class JpruneLlamaConfig(LlamaConfig):
    model_type = "jprune_llama"
    intermediate_sizes: list[int] | None = None
    v_head_dims: list[int] | None = None


class JpruneLlamaAttention(modeling_llama.LlamaAttention):
    """LLaMA attention with value heads narrower than query/key heads."""

    def __init__(self, config: JpruneLlamaConfig, layer_idx: int, v_head_dim: int):
        super().__init__(config, layer_idx)
        self.v_head_dim = v_head_dim
        bias = config.attention_bias
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * v_head_dim, bias=bias
        )
        self.o_proj = nn.Linear(
            config.num_attention_heads * v_head_dim, config.hidden_size, bias=bias
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.v_head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = modeling_llama.apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_llama.eager_attention_forward
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        output = output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(output), weights


class JpruneLlamaForCausalLM(LlamaForCausalLM):
    config_class = JpruneLlamaConfig

    def __init__(self, config: JpruneLlamaConfig):
        super().__init__(config)
        hidden, bias = config.hidden_size, config.mlp_bias
        for i, layer in enumerate(self.model.layers):
            width = config.intermediate_sizes[i]
            mlp = layer.mlp
            mlp.intermediate_size = width
            mlp.gate_proj = nn.Linear(hidden, width, bias=bias)
            mlp.up_proj = nn.Linear(hidden, width, bias=bias)
            mlp.down_proj = nn.Linear(width, hidden, bias=bias)
            if config.v_head_dims[i] != layer.self_attn.head_dim:
                layer.self_attn = JpruneLlamaAttention(config, i, config.v_head_dims[i])


JpruneLlamaConfig.register_for_auto_class()
JpruneLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
