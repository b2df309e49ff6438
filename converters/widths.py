"""The export of a structurally pruned model's widths: what tells transformers how wide each
layer is.

One MLP width everywhere and untouched value heads fit the stock config, with a new
``intermediate_size`` (``ffn_dim``). Anything else is a ``jprune_llama`` config that lists the
widths per layer, with its modeling code (``remote_llama.py``, written beside the weights as
``modeling_jprune_llama.py``) loaded through ``auto_map`` with ``trust_remote_code=True``. That
code is a LLaMA: other families can only take the stock case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jprune.converters.spec import ModelSpec

REMOTE_MODULE = "modeling_jprune_llama"
# Shipped as a module of this package; its text is written beside remote-code exports.
REMOTE_SOURCE = Path(__file__).with_name("remote_llama.py")
# The model types whose checkpoints the remote code describes (a per-layer-width export of
# another family would not load).
PER_LAYER_WIDTH_TYPES = ("llama", "jprune_llama")


def pruned_widths(
    spec: ModelSpec, shapes: Mapping[str, Sequence[int]]
) -> tuple[list[int], list[int]]:
    """Per layer, the MLP width (down's columns) and the value-head width (v's rows per kv
    head), read from the canonical parameter shapes."""
    layers = range(spec.num_layers)
    widths = [shapes[f"layers.{i}.down.weight"][1] for i in layers]
    v_heads = [shapes[f"layers.{i}.v.weight"][0] // spec.num_kv_heads for i in layers]
    return widths, v_heads


def width_config(
    spec: ModelSpec, hf_config: Mapping[str, Any], widths: list[int], v_heads: list[int]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Config changes (and files) that describe the pruned widths to transformers: the stock
    config's new MLP width, or the per-layer ``jprune_llama`` config and its modeling file."""
    stock = (
        len(set(widths)) == 1
        and set(v_heads) == {spec.head_dim}
        and "intermediate_sizes" not in hf_config
    )
    if stock:
        key = "ffn_dim" if spec.family == "opt" else "intermediate_size"
        return {key: widths[0]}, {}
    return (
        {
            "model_type": "jprune_llama",
            "architectures": ["JpruneLlamaForCausalLM"],
            "auto_map": {
                "AutoConfig": f"{REMOTE_MODULE}.JpruneLlamaConfig",
                "AutoModelForCausalLM": f"{REMOTE_MODULE}.JpruneLlamaForCausalLM",
            },
            "intermediate_size": max(widths),
            "intermediate_sizes": widths,
            "v_head_dims": v_heads,
        },
        {f"{REMOTE_MODULE}.py": REMOTE_SOURCE.read_text()},
    )
