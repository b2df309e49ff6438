"""Parity of jprune's JAX models with transformers, and bit-exact HF -> JAX -> HF round trips."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jprune.converters.hf import load_model, save_model
from jprune.model import apply_block, block_linear_names, embed_tokens, head_logits, logits

from conftest import STORIES260K
from hf_zoo import ARCHITECTURES


def _torch_logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _random_ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers(zoo, arch):
    model, config = load_model(zoo[arch])
    ids = _random_ids(config["vocab_size"], (2, 300))
    ours = np.asarray(logits(model, jnp.asarray(ids)))
    ref = _torch_logits(zoo[arch], ids)
    assert ours.shape == ref.shape
    # the logits are O(1-10) here, so this is a real check of every switch in the spec
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_stories260k_logits_match_transformers(assets):
    model, _ = load_model(STORIES260K)
    ids = _random_ids(512, (2, 500), seed=1)
    ours = np.asarray(logits(model, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, _torch_logits(STORIES260K, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "stories260K"])
def test_round_trip_is_bit_exact(zoo, assets, tmp_path, arch):
    source = STORIES260K if arch == "stories260K" else zoo[arch]
    model, config = load_model(source)
    out = save_model(model, config, tmp_path / "out", source=source)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert original.keys() == reloaded.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, reloaded[name]), name


def test_block_functions_compose_to_the_forward(zoo):
    """embed -> apply_block per layer -> head equals the jitted whole-model forward."""
    from flax import nnx

    model, config = load_model(zoo["llama3-gqa"])
    ids = jnp.asarray(_random_ids(config["vocab_size"], (1, 64)))
    x = embed_tokens(model, ids)
    for block in model.layers:
        x, taps = apply_block(*nnx.split(block), x)
        assert set(taps) == {"attn_in", "o_in", "mlp_in", "down_in"}
    np.testing.assert_allclose(head_logits(model, x), logits(model, ids), atol=1e-5)
    assert block_linear_names(model.spec) == ("q", "k", "v", "o", "gate", "up", "down")


def test_bin_and_sharded_checkpoints_load(zoo, tmp_path):
    source = zoo["qwen2"]
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = _random_ids(96, (1, 40))
    ref = _torch_logits(source, ids)
    model, config = load_model(source)
    sharded = save_model(model, config, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    np.testing.assert_allclose(logits(load_model(sharded)[0], jnp.asarray(ids)), ref, atol=1e-4)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    bin_dir = tmp_path / "bin_only"
    bin_dir.mkdir()
    (tmp_path / "pytorch_model.bin").rename(bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((source / "config.json").read_text())
    np.testing.assert_allclose(logits(load_model(bin_dir)[0], jnp.asarray(ids)), ref, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_round_trip(zoo, tmp_path, dtype):
    torch_dtype = getattr(torch, dtype)
    half = AutoModelForCausalLM.from_pretrained(zoo["llama-mha"], dtype=torch_dtype)
    half.save_pretrained(tmp_path / "half")
    model, config = load_model(tmp_path / "half")
    assert str(model.layers[0].q.weight[...].dtype) == dtype
    out = save_model(model, config, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype).state_dict()
    for name, tensor in half.state_dict().items():
        assert torch.equal(tensor, reloaded[name]), name
    # casting on load: float32 weights to bfloat16
    cast, _ = load_model(zoo["llama-mha"], dtype="bfloat16")
    assert str(cast.layers[0].q.weight[...].dtype) == "bfloat16"
