"""Perplexity against transformers (PyTorch, float32) under the METHODS.md protocol, and the data windows."""

import random

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jprune import evaluate
from jprune.config import EvaluationConfig
from jprune.converters.hf import Checkpoint, load_model
from jprune.data import calibration_windows, eval_windows, load_tokenizer, read_text, tokenize
from jprune.errors import JpruneError
from jprune.evaluate import perplexity
from jprune.model import logits as jprune_logits

from conftest import CALIB_TEXT, EVAL_TEXT, STORIES260K


def _torch_perplexity(path, windows: np.ndarray, batch_size: int = 16) -> float:
    """The reference: exp(mean next-token NLL over all windows), computed in PyTorch."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = torch.as_tensor(windows[start : start + batch_size], dtype=torch.long)
            logits = model(ids).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            tokens += ids[:, 1:].numel()
    return float(np.exp(total / tokens))


@pytest.fixture(scope="module")
def stories(assets):
    """stories260K on the TinyStories eval text at seqlen 512: windows, ours, transformers'."""
    ids = tokenize(load_tokenizer(STORIES260K), read_text(EVAL_TEXT))
    windows = eval_windows(ids, 512)
    model, _ = load_model(STORIES260K)
    return (
        ids,
        windows,
        perplexity(model, windows, batch_size=8),
        _torch_perplexity(STORIES260K, windows),
    )


def test_stories260k_perplexity_matches_transformers(stories):
    ids, windows, ours, ref = stories
    assert ids[0] == 1  # BOS once, at the start of the whole text
    assert (ids[1:] != 1).all()
    assert ours.windows == len(ids) // 512 == windows.shape[0]
    assert ours.tokens == ours.windows * 511
    assert ours.seqlen == 512
    assert round(ours.perplexity, 2) == 6.21
    assert ours.perplexity == pytest.approx(ref, rel=1e-5)
    assert np.exp(ours.mean_nll) == pytest.approx(ours.perplexity, rel=1e-12)


@pytest.mark.parametrize(
    "arch",
    [
        "opt-project",
        "llama3-gqa",
        "qwen2",
        "qwen3",
        "mistral",
        "gemma2",
        "gemma3",
        "phi3",
        "qwen3-moe",
        "mixtral",
    ],
)
def test_zoo_perplexity_matches_transformers(zoo, arch):
    model, config = load_model(zoo[arch])
    windows = np.random.default_rng(3).integers(0, config["vocab_size"], (5, 200)).astype(np.int32)
    ours = perplexity(model, windows, batch_size=2)
    ref = _torch_perplexity(zoo[arch], windows)
    # random weights and ids: the model is far from uniform, so this is not a trivial match
    assert abs(np.log(ours.perplexity) - np.log(config["vocab_size"])) > 0.05
    assert ours.perplexity == pytest.approx(ref, rel=1e-5)


def test_batch_size_not_dividing_window_count_changes_nothing(zoo):
    model, config = load_model(zoo["qwen2"])
    windows = np.random.default_rng(4).integers(0, config["vocab_size"], (7, 64)).astype(np.int32)
    one = perplexity(model, windows, batch_size=1)
    done = []
    three = perplexity(model, windows, batch_size=3, progress=lambda *n: done.append(n))
    blocks = model.spec.num_layers
    assert done == [(n, blocks) for n in range(1, blocks + 1)]  # one call per block
    assert three.perplexity == pytest.approx(one.perplexity, rel=1e-6)
    assert perplexity(model, windows, batch_size=100).perplexity == pytest.approx(
        one.perplexity, rel=1e-6
    )
    assert (three.windows, three.tokens) == (7, 7 * 63)


def _whole_model_perplexity(model, windows: np.ndarray) -> float:
    """The previous path: the whole model at once, full (windows, seqlen, vocab) logits."""
    logits = np.asarray(jprune_logits(model, jnp.asarray(windows)), dtype=np.float64)[:, :-1]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)
    return float(np.exp(-picked.mean()))


@pytest.mark.parametrize("arch", ["llama3-gqa", "opt-project"])
def test_streamed_perplexity_equals_the_whole_model_at_once(zoo, arch, monkeypatch):
    """A checkpoint read a block at a time, the head's logits formed a few tokens at a time
    (chunks that do not divide the token count), gives the whole-model perplexity."""
    model, config = load_model(zoo[arch])
    windows = np.random.default_rng(5).integers(0, config["vocab_size"], (5, 48)).astype(np.int32)
    reference = _whole_model_perplexity(model, windows)
    monkeypatch.setattr(evaluate, "LOGITS_CHUNK_BYTES", 4 * config["vocab_size"] * 37)
    streamed = perplexity(Checkpoint(zoo[arch]), windows, batch_size=2)
    assert streamed.perplexity == pytest.approx(reference, rel=1e-6)
    assert perplexity(model, windows, batch_size=2).perplexity == streamed.perplexity


def _batch_bytes(spec, batch_size: int, seqlen: int) -> int:
    """What one batch of windows holds through a block: its inputs and outputs, float32."""
    return 2 * batch_size * seqlen * spec.hidden_size * 4


def test_windows_in_groups_give_the_single_group_nll_exactly(assets, stories):
    """20 stories260K windows in 3 batches of 8 (the last padded), 2 batches a group (the
    last group partial) through a checkpoint read again per group: the summed NLL of one group
    bit for bit, and transformers' perplexity."""
    windows = stories[1][:20]
    checkpoint = Checkpoint(STORIES260K)
    budget = 2 * _batch_bytes(checkpoint.spec, 8, 512) + 1
    assert evaluate.group_batches(checkpoint.spec, windows.shape, 8, budget) == 2
    done = []
    grouped = perplexity(
        checkpoint, windows, activation_bytes=budget, progress=lambda *n: done.append(n)
    )
    single = perplexity(checkpoint, windows)
    assert grouped.mean_nll == single.mean_nll
    assert grouped == single
    passes = 2 * checkpoint.spec.num_layers  # groups x blocks
    assert done == [(n, passes) for n in range(1, passes + 1)]
    assert grouped.perplexity == pytest.approx(_torch_perplexity(STORIES260K, windows), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama3-gqa", "opt-project"])
def test_a_budget_below_one_batch_goes_a_batch_at_a_time(zoo, arch):
    model, config = load_model(zoo[arch])
    windows = np.random.default_rng(6).integers(0, config["vocab_size"], (9, 40)).astype(np.int32)
    single = perplexity(model, windows, batch_size=2)
    for budget in (1, _batch_bytes(model.spec, 2, 40) * 3 - 1):  # 1 and 2 batches a group
        assert perplexity(model, windows, batch_size=2, activation_bytes=budget) == single
    assert single.perplexity == pytest.approx(_whole_model_perplexity(model, windows), rel=1e-6)


def test_the_evaluation_bound_is_one_groups_activations(zoo):
    model, _ = load_model(zoo["llama3-gqa"])
    spec, batch = model.spec, _batch_bytes(model.spec, 4, 100)
    logits = 2 * evaluate.LOGITS_CHUNK_BYTES
    # 30 windows: 8 batches of 4, the last padded
    assert evaluate.group_batches(spec, (30, 100), 4, 1) == 1
    assert evaluate.group_batches(spec, (30, 100), 4, 3 * batch) == 3
    assert evaluate.group_batches(spec, (30, 100), 4, 100 * batch) == 8
    assert evaluate.evaluation_bytes(spec, (30, 100), 4, 1) == batch + logits
    assert evaluate.evaluation_bytes(spec, (30, 100), 4, 3 * batch + 7) == 3 * batch + logits
    assert evaluate.evaluation_bytes(spec, (30, 100), 4, 10**12) == 8 * batch + logits
    # fewer windows than a batch: one batch of them
    assert evaluate.evaluation_bytes(spec, (3, 100), 4, 1) == 3 * batch // 4 + logits
    assert EvaluationConfig().memory_mib * 2**20 == evaluate.ACTIVATION_BYTES


def test_perplexity_refuses_bad_arguments(zoo):
    model, config = load_model(zoo["llama-mha"])
    windows = np.zeros((2, 16), dtype=np.int32)
    with pytest.raises(JpruneError, match="batch size"):
        perplexity(model, windows, batch_size=0)
    with pytest.raises(JpruneError, match="activation budget"):
        perplexity(model, windows, activation_bytes=0)
    too_long = np.zeros((1, config["max_position_embeddings"] + 1), dtype=np.int32)
    with pytest.raises(JpruneError, match="max_position_embeddings"):
        perplexity(model, too_long)


def test_eval_windows_drop_the_remainder():
    ids = np.arange(23, dtype=np.int32)
    windows = eval_windows(ids, 5)
    assert windows.shape == (4, 5)
    np.testing.assert_array_equal(windows.ravel(), ids[:20])
    assert eval_windows(ids[:20], 5).shape == (4, 5)
    with pytest.raises(JpruneError, match="shorter than one window"):
        eval_windows(ids, 24)
    with pytest.raises(JpruneError, match="seqlen"):
        eval_windows(ids, 1)


def test_calibration_windows_are_seeded(assets):
    ids = tokenize(load_tokenizer(STORIES260K), read_text(CALIB_TEXT))
    a = calibration_windows(ids, 16, 128, seed=0)
    b = calibration_windows(ids, 16, 128, seed=0)
    c = calibration_windows(ids, 16, 128, seed=1)
    assert a.shape == (16, 128) and a.dtype == ids.dtype
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the SparseGPT/Wanda convention: starts drawn by Python's random seeded with `seed`
    rng = random.Random(0)
    starts = [rng.randint(0, len(ids) - 128 - 1) for _ in range(16)]
    np.testing.assert_array_equal(a, np.stack([ids[s : s + 128] for s in starts]))
    with pytest.raises(JpruneError, match="more than"):
        calibration_windows(ids, len(ids) // 128 + 1, 128, seed=0)
