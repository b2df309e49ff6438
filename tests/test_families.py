"""The model families beyond LLaMA/Qwen2/OPT: Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3, and the
mixtures of experts Qwen3-MoE and Mixtral.

Logit parity and bit-exact round trips run for every family in test_models (the zoo), and
perplexity parity in test_evaluate. Here: sliding windows change results exactly as in
transformers, real configs load (or are refused by name), and pruned checkpoints reload
with exact sparsity and the reported perplexity.
"""

import json
import math
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from jprune.converters.hf import (
    TOKENIZER_FILES,
    Checkpoint,
    CheckpointError,
    load_model,
    read_tensors,
    save_model,
)
from jprune.converters.spec import UnsupportedModelError, spec_from_hf_config
from jprune.data import eval_windows, load_tokenizer, read_text, tokenize
from jprune.errors import JpruneError
from jprune.methods.base import UNROUTED_FALLBACK
from jprune.model import apply_block, logits
from jprune.walk import accumulate_grams

import hf_zoo
from conftest import CALIB_TEXT, CHEAP_OPTIONS, EVAL_TEXT, STORIES260K, prune_with

FAMILIES = ("qwen3", "mistral", "gemma2", "gemma3", "phi3", "qwen3-moe", "mixtral", "qwen2", "opt")


def _torch_logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _rewrite_config(source, target, **changes):
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text()) | changes
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "phi3"])
def test_sliding_window_changes_logits_as_in_transformers(zoo, tmp_path, arch):
    """The same weights with and without a window shorter than the input: transformers and
    jprune agree on both, and the two differ (so the window is not silently ignored)."""
    ids = np.random.default_rng(7).integers(0, 96, (1, 3 * hf_zoo.WINDOW))
    windowed = zoo[arch]
    wide = _rewrite_config(windowed, tmp_path / "wide", sliding_window=4096)
    results = {}
    for name, path in (("windowed", windowed), ("wide", wide)):
        model, _ = load_model(path)
        ours = np.asarray(logits(model, jnp.asarray(ids)))
        ref = _torch_logits(path, ids)
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
        results[name] = ours
    first_window = min(48, hf_zoo.WINDOW)  # phi3's window is 48
    # positions inside the first window see the same keys either way; later ones do not
    np.testing.assert_allclose(
        results["windowed"][:, :first_window], results["wide"][:, :first_window], atol=1e-5
    )
    assert np.abs(results["windowed"] - results["wide"]).max() > 1e-2


def test_fused_phi3_tensors_split_into_logical_projections(zoo):
    checkpoint = Checkpoint(zoo["phi3"])
    shapes = {k: v.shape for k, v in checkpoint.shapes.items() if k.startswith("layers.0.")}
    # 4 query heads, 2 kv heads of 8 dims; MLP 48 wide
    assert shapes["layers.0.q.weight"] == (32, 32)
    assert shapes["layers.0.k.weight"] == shapes["layers.0.v.weight"] == (16, 32)
    assert shapes["layers.0.gate.weight"] == shapes["layers.0.up.weight"] == (48, 32)
    hf = AutoModelForCausalLM.from_pretrained(zoo["phi3"], dtype=torch.float32)
    block = checkpoint.block(0)
    fused_qkv = hf.model.layers[0].self_attn.qkv_proj.weight.detach().numpy()
    np.testing.assert_array_equal(
        np.concatenate([block[f"layers.0.{r}.weight"] for r in "qkv"]), fused_qkv
    )
    gate, up = hf.model.layers[0].mlp.gate_up_proj.weight.detach().numpy().reshape(2, 48, 32)
    np.testing.assert_array_equal(block["layers.0.gate.weight"], gate)
    np.testing.assert_array_equal(block["layers.0.up.weight"], up)


# ---------------------------------------------------------------- configs

# Hub configs as their repositories ship them (transformers 4 era, legacy rope fields).
HUB_CONFIGS = {
    "Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0",
        "use_cache": True,
        "vocab_size": 32000,
    },
    "gemma-2-2b": {
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2304,
        "initializer_range": 0.02,
        "intermediate_size": 9216,
        "max_position_embeddings": 8192,
        "model_type": "gemma2",
        "num_attention_heads": 8,
        "num_hidden_layers": 26,
        "num_key_value_heads": 4,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "torch_dtype": "float32",
        "transformers_version": "4.42.4",
        "use_cache": True,
        "vocab_size": 256000,
    },
    "gemma-3-1b-it": {
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": [1, 106],
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "initializer_range": 0.02,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "model_type": "gemma3_text",
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0",
        "use_cache": True,
        "vocab_size": 262144,
    },
    "Phi-3-mini-4k-instruct": {
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_phi3.Phi3Config",
            "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
        },
        "bos_token_id": 1,
        "embd_pdrop": 0.0,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_size": 3072,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 4096,
        "model_type": "phi3",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": 2047,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.2",
        "use_cache": True,
        "unk_token_id": 0,
        "vocab_size": 32064,
    },
}
HUB_CONFIGS["Qwen3-30B-A3B"] = {
    **{k: v for k, v in HUB_CONFIGS["Qwen3-0.6B"].items() if k != "tie_word_embeddings"},
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "decoder_sparse_step": 1,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
}
HUB_CONFIGS["Mixtral-8x7B-v0.1"] = {
    **HUB_CONFIGS["Mistral-7B-v0.1"],
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "max_position_embeddings": 32768,
    "num_experts_per_tok": 2,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rope_theta": 1e6,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
}
_CONFIG_CLASSES = {
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "phi3": "Phi3Config",
    "qwen3_moe": "Qwen3MoeConfig",
    "mixtral": "MixtralConfig",
}


def _saved_default(tmp_path, class_name):
    getattr(transformers, class_name)().save_pretrained(tmp_path / class_name)
    return json.loads((tmp_path / class_name / "config.json").read_text())


def _transformers_windows(config: dict) -> list[int | None]:
    """The window each layer's attention gets in transformers, read off its config object."""
    hf = getattr(transformers, _CONFIG_CLASSES[config["model_type"]]).from_dict(config)
    if config["model_type"] in ("mistral", "mixtral", "qwen3_moe", "phi3"):
        return [hf.sliding_window] * hf.num_hidden_layers
    return [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]


def _configs(tmp_path):
    saved = {name: _saved_default(tmp_path, name) for name in _CONFIG_CLASSES.values()}
    return {**saved, **HUB_CONFIGS}


def test_real_and_default_configs_load(tmp_path):
    specs = {}
    for name, config in _configs(tmp_path).items():
        spec = specs[name] = spec_from_hf_config(config)
        windows = [spec.window(i) for i in range(spec.num_layers)]
        assert windows == _transformers_windows(config), name
    # spot checks of what each family switches on
    gemma2, gemma3 = specs["gemma-2-2b"], specs["gemma-3-1b-it"]
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (50.0, 30.0)
    assert gemma2.attention_scale == 256**-0.5 and gemma2.tie_embeddings
    assert gemma2.norm_offset == 1.0 and gemma2.output_norms and gemma2.embed_scale
    assert gemma2.activation == "gelu_tanh" and not gemma2.qk_norm
    assert gemma3.qk_norm and gemma3.attn_softcap is None and gemma3.final_softcap is None
    assert [gemma3.layer_rope(i).theta for i in range(6)] == [10_000.0] * 5 + [1_000_000.0]
    assert [gemma3.window(i) for i in range(6)] == [512] * 5 + [None]
    qwen3 = specs["Qwen3-0.6B"]
    assert qwen3.qk_norm and qwen3.head_dim == 128 and not qwen3.qkv_bias
    assert qwen3.layer_windows == () and qwen3.rope.theta == 1e6
    assert specs["Mistral-7B-v0.1"].window(31) == 4096
    phi3 = specs["Phi-3-mini-4k-instruct"]
    assert phi3.window(0) == 2047 and phi3.rope.partial_rotary_factor == 1.0
    assert specs["Gemma3TextConfig"].layer_rope(5).theta == 1_000_000.0
    moe = specs["Qwen3-30B-A3B"]
    assert (moe.num_experts, moe.experts_per_token, moe.intermediate_size) == (128, 8, 768)
    assert moe.normalize_routing and moe.qk_norm
    mixtral = specs["Mixtral-8x7B-v0.1"]
    assert (mixtral.num_experts, mixtral.experts_per_token) == (8, 2) and mixtral.normalize_routing
    assert mixtral.intermediate_size == 14336 and mixtral.layer_windows == ()


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("gemma-2-2b", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma-2-2b", {"hidden_act": "gelu"}, "differs from hidden_activation"),
        ("gemma-2-2b", {"sliding_window_size": 4096}, "'sliding_window_size'"),
        ("gemma-3-1b-it", {"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "yarn"),
        ("gemma-3-1b-it", {"sliding_window": None}, "need a sliding_window"),
        (
            "Phi-3-mini-4k-instruct",
            {"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
            "longrope",
        ),
        ("Mistral-7B-v0.1", {"layer_types": ["full_attention"] * 32}, "'layer_types'"),
        ("Qwen3-0.6B", {"layer_types": ["full_attention"] * 3}, "layer_types must list 28"),
        ("Qwen3-0.6B", {"qk_layernorm": False}, "'qk_layernorm'"),
        ("Qwen3-0.6B", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ("Qwen3-30B-A3B", {"mlp_only_layers": [0]}, "dense layers"),
        ("Qwen3-30B-A3B", {"shared_expert_intermediate_size": 512}, "'shared_expert_inter"),
        ("Mixtral-8x7B-v0.1", {"num_experts_per_tok": 9}, "between 1 and the 8 experts"),
    ],
)
def test_numerics_changing_fields_are_refused_by_name(name, changes, message):
    with pytest.raises(UnsupportedModelError, match=message):
        spec_from_hf_config(HUB_CONFIGS[name] | changes)


# ---------------------------------------------------------------- pruning

# Each family with each method; in the suite the pattern alternates so that every family and
# every method meets both 50% and 2:4 (what a family changes is the forward and the tensor
# names, independent of the pattern; all combinations would double the suite's time for pairs
# already covered). JPRUNE_FULL_FAMILY_MATRIX=1 runs every combination: bench/families.py
# builds the support table from that run.
FULL_MATRIX = os.environ.get("JPRUNE_FULL_FAMILY_MATRIX") == "1"
PRUNE_CASES = [
    (family, method, pattern)
    for f, family in enumerate(FAMILIES)
    for m, method in enumerate(("sparsegpt", "wanda", "fista"))
    for p, pattern in enumerate(("0.5", "2:4"))
    if FULL_MATRIX or (f + m + p) % 2 == 0
]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, assets):
    """The zoo families with stories260K's 512-token vocabulary and its tokenizer, so real
    TinyStories text calibrates and evaluates them; and a short evaluation text. One head
    width for all (the zoo's parity models cover explicit head_dim): every family's linears
    then have the same shapes, so the solvers compile once for all of them."""
    root = tmp_path_factory.mktemp("families")
    models = {}
    for family in FAMILIES:
        head = {} if family == "opt" else {"head_dim": 8}  # OPT's config has no head_dim
        directory = hf_zoo.build(family, root / family, vocab_size=512, **head)
        for name in TOKENIZER_FILES:
            if (STORIES260K / name).is_file():
                shutil.copy(STORIES260K / name, directory / name)
        models[family] = directory
    eval_text = root / "eval.txt"
    eval_text.write_text(read_text(EVAL_TEXT)[:20_000])
    return models, eval_text


def _transformers_perplexity(path, text, seqlen):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    windows = eval_windows(tokenize(load_tokenizer(path), read_text(text)), seqlen)
    with torch.no_grad():
        ids = torch.tensor(windows, dtype=torch.long)
        logp = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
        nll = -logp.gather(-1, ids[:, 1:, None]).sum().item()
    return math.exp(nll / (windows.shape[0] * (seqlen - 1))), model


@pytest.mark.parametrize(("family", "method", "target"), PRUNE_CASES)
def test_pruned_family_reloads_exact(family_models, tmp_path, family, method, target):
    models, eval_text = family_models
    out = tmp_path / "pruned"
    settings = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    report = prune_with(
        models[family],
        method,
        **settings,
        calib=CALIB_TEXT,
        nsamples=4,
        seqlen=2 * hf_zoo.WINDOW,  # longer than every window
        seed=0,
        out=out,
        eval_texts=[eval_text],
        eval_seqlen=2 * hf_zoo.WINDOW,
        method_options=CHEAP_OPTIONS.get(method, {}),
    )
    ppl, model = _transformers_perplexity(out, eval_text, 2 * hf_zoo.WINDOW)
    assert ppl == pytest.approx(report["perplexity"][str(eval_text)]["after"], rel=1e-5)
    matrices = 0
    decoder = model.model.decoder if family == "opt" else model.model
    for layer in decoder.layers:
        for name, weight in layer.named_parameters():
            # every matrix of a block is pruned but the router (mlp.gate, a dense linear)
            if weight.dim() < 2 or name == "mlp.gate.weight":
                continue
            nonzero = (weight != 0).numpy()
            d_in = nonzero.shape[-1]
            nonzero = nonzero.reshape(-1, d_in)  # stacked experts: every expert's rows
            if ":" in target:
                assert (nonzero.reshape(-1, d_in // 4, 4).sum(-1) == 2).all(), name
            else:
                assert (nonzero.sum(1) == d_in - d_in // 2).all(), name
            matrices += 1
    names = [layer["name"] for layer in report["layers"]]
    if family == "phi3":
        assert matrices == 2 * 4  # fused qkv_proj and gate_up_proj
        assert "model.layers.0.self_attn.qkv_proj[k]" in names
        assert "model.layers.1.mlp.gate_up_proj[up]" in names
    if "moe" in family or family == "mixtral":
        assert matrices == 2 * (4 + 2)  # transformers stacks the experts
        assert len(names) == 2 * (4 + 4 * 3)  # every expert's gate, up and down
    elif family == "opt":
        assert matrices == len(names) == 2 * 6  # q, k, v, out_proj, fc1, fc2
    else:
        assert len(names) == 2 * 7  # each logical projection is its own layer, fused or not


# ---------------------------------------------------------------- mixtures of experts


@pytest.mark.parametrize("arch", ["qwen3-moe", "mixtral"])
def test_stacked_expert_layout_loads_and_is_written_back(zoo, tmp_path, arch):
    """transformers 5's stacked expert tensors (the zoo holds the hub's per-expert layout):
    same logits as transformers, and a bit-exact round trip in the same layout."""
    stacked = hf_zoo.write_stacked_expert_layout(
        Path(shutil.copytree(zoo[arch], tmp_path / "stacked"))
    )
    checkpoint = Checkpoint(stacked)
    assert checkpoint.spec.expert_layout == "fused"
    assert Checkpoint(zoo[arch]).spec.expert_layout == "per_expert"
    ids = np.random.default_rng(8).integers(0, 96, (2, 150))
    model, config = load_model(stacked)
    ref = _torch_logits(stacked, ids)
    np.testing.assert_allclose(np.asarray(logits(model, jnp.asarray(ids))), ref, atol=1e-4)
    out = save_model(model, config, tmp_path / "out")
    written = read_tensors(out)
    assert "model.layers.0.mlp.experts.gate_up_proj" in written
    original = read_tensors(stacked)
    assert written.keys() == original.keys()
    for name, tensor in original.items():
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)


@pytest.mark.parametrize(
    ("arch", "tensor", "message"),
    [
        ("qwen3-moe", "model.layers.1.mlp.experts.2.up_proj.weight", "layer 1: experts.2.up has"),
        (
            "mixtral",
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "layer 1: experts.3.down has",
        ),
        ("llama3-gqa", "model.layers.0.mlp.down_proj.weight", "layer 0: down has"),
    ],
)
def test_tensor_width_other_than_the_config_is_refused(zoo, tmp_path, arch, tensor, message):
    """Every expert's MLP tensors are checked against the config, not only the first expert's:
    a narrower expert would otherwise load and run."""
    copy = Path(shutil.copytree(zoo[arch], tmp_path / arch))
    tensors = load_file(copy / "model.safetensors")
    axis = 1 if tensor.endswith(("down_proj.weight", "w2.weight")) else 0
    tensors[tensor] = np.delete(tensors[tensor], 0, axis=axis)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{message} intermediate width"):
        Checkpoint(copy)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_routed_token_grams_match_numpy(zoo):
    """Each expert's Grams are those of the calibration tokens routed to it (float64 NumPy
    reference: router softmax, top-2, the chosen tokens' inputs and hidden activations)."""
    model, _ = load_model(zoo["qwen3-moe"])
    block = model.layers[0]
    x = np.random.default_rng(9).standard_normal((3, 40, 32)).astype(np.float32)
    graphdef, state = nnx.split(block)
    taps = [f"experts.{e}.{t}" for e in range(4) for t in ("mlp_in", "down_in")]
    grams = accumulate_grams(graphdef, taps, state, None, jnp.asarray(x), None, batch_size=2)
    _, outputs = apply_block(graphdef, state, jnp.asarray(x))
    mlp_in = np.asarray(outputs["mlp_in"], np.float64).reshape(-1, 32)
    probs = _softmax(mlp_in @ np.asarray(block.router.weight[...], np.float64).T)
    chosen = np.argsort(-probs, axis=-1)[:, :2]
    counts = []
    for e, expert in enumerate(block.experts):
        routed = mlp_in[(chosen == e).any(-1)]
        counts.append(len(routed))
        gate = routed @ np.asarray(expert.gate.weight[...], np.float64).T
        hidden = gate / (1 + np.exp(-gate)) * (routed @ np.asarray(expert.up.weight[...]).T)
        for tap, inputs in (("mlp_in", routed), ("down_in", hidden)):
            np.testing.assert_allclose(
                grams[f"experts.{e}.{tap}"]["gram"], inputs.T @ inputs, rtol=2e-5, atol=2e-4
            )
    assert sum(counts) == 2 * 120 and min(counts) > 0  # every token twice, every expert used


def test_expert_without_routed_tokens_falls_back_to_magnitude(family_models, tmp_path):
    """Top-1 routing with router rows (u, -u, 0, 0): every token goes to expert 0 or 1, never
    to 2 or 3. Those two are pruned from the identity Gram (magnitude) and the report says so."""
    models, _ = family_models
    source = Path(shutil.copytree(models["mixtral"], tmp_path / "top1"))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"num_experts_per_tok": 1}))
    tensors = read_tensors(source)
    for name in [n for n in tensors if n.endswith("block_sparse_moe.gate.weight")]:
        u = tensors[name][0]
        tensors[name] = np.stack([u, -u, np.zeros_like(u), np.zeros_like(u)])
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "pruned"
    report = prune_with(
        source, "sparsegpt", sparsity=0.5, calib=CALIB_TEXT, nsamples=4, seqlen=64, out=out
    )
    fallbacks = {
        layer["name"]: layer["info"].get("fallback")
        for layer in report["layers"]
        if ".experts." in layer["name"]
    }
    assert len(fallbacks) == 2 * 4 * 3
    for name, fallback in fallbacks.items():
        unrouted = ".experts.2." in name or ".experts.3." in name
        assert (fallback == UNROUTED_FALLBACK) == unrouted, name
    pruned = read_tensors(out)
    for name, weight in tensors.items():
        if ".experts.2." in name or ".experts.3." in name:
            keep = np.argsort(-np.abs(weight), axis=1, kind="stable")[:, : weight.shape[1] // 2]
            expected = np.zeros_like(weight)
            np.put_along_axis(expected, keep, np.take_along_axis(weight, keep, 1), 1)
            np.testing.assert_array_equal(pruned[name], expected, err_msg=name)


# ---------------------------------------------------------------- structured

STRUCTURED_CASES = list(
    zip(
        ("qwen3", "mistral", "gemma2", "gemma3", "phi3", "qwen2"),
        ("fasp", "spap", "wanda-sp", "spap", "fasp", "wanda-sp"),
        strict=True,
    )
)


@pytest.mark.parametrize(("family", "method"), STRUCTURED_CASES)
def test_structured_mlp_pruning_exports_stock_config(family_models, tmp_path, family, method):
    """Uniform MLP channel pruning on each dense family: a stock config with the new
    intermediate_size (Phi-3's fused gate_up_proj written narrower), which transformers
    reloads with the logits jprune computes."""
    models, _ = family_models
    out = tmp_path / "narrow"
    options = CHEAP_OPTIONS.get(method, {})
    prune_with(
        models[family],
        method,
        sparsity=0.25,
        calib=CALIB_TEXT,
        nsamples=4,
        seqlen=2 * hf_zoo.WINDOW,
        out=out,
        method_options=options,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 36 and "auto_map" not in config
    ids = np.random.default_rng(10).integers(0, 512, (1, 3 * hf_zoo.WINDOW))
    model, _ = load_model(out)
    assert model.layers[1].down.weight[...].shape == (32, 36)
    ours = np.asarray(logits(model, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, _torch_logits(out, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("family", "options", "message"),
    [
        # per-layer widths (v/o channels, non-uniform MLPs) export through LLaMA's remote code
        *[
            (family, {"attention": True}, "implemented for LLaMA only")
            for family in ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")
        ],
        ("qwen3-moe", {}, "structured pruning of qwen3_moe's experts is not implemented"),
        ("mixtral", {}, "structured pruning of mixtral's experts is not implemented"),
    ],
)
def test_structured_refusals_name_the_family(family_models, tmp_path, family, options, message):
    models, _ = family_models
    with pytest.raises(JpruneError, match=message):
        prune_with(
            models[family],
            "fasp",
            sparsity=0.25,
            calib=CALIB_TEXT,
            nsamples=4,
            seqlen=64,
            out=tmp_path / "never",
            method_options=options,
        )
    assert not (tmp_path / "never").exists()
