"""Baseline layer methods: magnitude, Wanda, SparseGPT.

SparseGPT is checked against a float64 NumPy transcription of the published algorithm
(Frantar & Alistarh 2023, Algorithm 1 and the public reference), written here with plain loops.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprune.errors import JpruneError
from jprune.methods import METHODS, LayerProblem
from jprune.methods.sparsegpt import sparsegpt_prune
from jprune.methods.wanda import wanda_scores
from jprune.solvers import NM, Unstructured

PATTERNS = [
    Unstructured(0.5),
    Unstructured(0.6),
    Unstructured(0.7),
    Unstructured(0.6, "matrix"),
    Unstructured(0.7, "matrix"),
    NM(2, 4),
    NM(4, 8),
]


def random_layer(d_out, d_in, n_tokens, *, seed=0, correlated=False, dead=()):
    """A weight and calibration inputs ``X`` (d_in, n); correlated inputs share latent factors."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((d_out, d_in))
    x = rng.standard_normal((d_in, n_tokens))
    if correlated:
        mixing = rng.standard_normal((d_in, d_in)) / np.sqrt(d_in) + 0.3 * np.eye(d_in)
        x = np.exp(rng.standard_normal((d_in, 1))) * (mixing @ x)
    x[list(dead)] = 0.0
    return weight.astype(np.float32), x.astype(np.float32)


def problem_of(weight, x):
    x64 = x.astype(np.float64)
    gram = jnp.asarray((x64 @ x64.T).astype(np.float32))
    return LayerProblem(jnp.asarray(weight), gram, None, x.shape[1], "test")


def reference_sparsegpt(weight, x, pattern, blocksize, percdamp=0.01):
    """Published SparseGPT in float64 loops; returns (pruned weight, per-row OBS losses).

    The published unstructured mask prunes ``int(s * block numel)`` lowest scores of each block
    (its ``<=`` threshold prunes one more; we, and jprune, prune exactly that many). Row scope
    follows jprune's documented rule: each row's budget is shared among blocks by its initial
    scores, then pruned from its lowest current scores in each block.
    """
    W = weight.astype(np.float64).copy()
    d_out, d_in = W.shape
    x = x.astype(np.float64)
    H = 2.0 * x @ x.T / x.shape[1]
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * np.mean(np.diag(H)) * np.eye(d_in)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: Hinv^T Hinv = H^-1
    losses = np.zeros(d_out)

    row_budget = None
    if isinstance(pattern, Unstructured) and pattern.scope == "row":
        scores = W**2 / np.diag(Hinv)[None, :] ** 2
        ranks = np.argsort(np.argsort(scores, axis=1, kind="stable"), axis=1, kind="stable")
        row_budget = ranks < math.floor(pattern.sparsity * d_in)

    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = np.zeros(W1.shape, bool)
        if isinstance(pattern, Unstructured):
            tmp = W1**2 / np.diag(Hinv1)[None, :] ** 2
            if row_budget is None:
                order = np.argsort(tmp, axis=None, kind="stable")
                mask1.flat[order[: int(tmp.size * pattern.sparsity)]] = True
            else:
                for r in range(d_out):
                    count = row_budget[r, i1:i2].sum()
                    mask1[r, np.argsort(tmp[r], kind="stable")[:count]] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if isinstance(pattern, NM) and i % pattern.m == 0:
                m = pattern.m
                tmp = W1[:, i : i + m] ** 2 / np.diag(Hinv1)[i : i + m][None, :] ** 2
                lowest = np.argsort(tmp, axis=1, kind="stable")[:, : m - pattern.n]
                np.put_along_axis(mask1[:, i : i + m], lowest, True, axis=1)
            q = w.copy()
            q[mask1[:, i]] = 0.0
            Q1[:, i] = q
            losses += (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, losses


def reconstruction_error(weight, pruned, x):
    delta = (np.asarray(pruned, np.float64) - weight) @ x.astype(np.float64)
    return float(np.sum(delta**2))


def assert_exact_counts(pruned, pattern):
    d_out, d_in = pruned.shape
    zeros = pruned == 0
    if isinstance(pattern, NM):
        per_group = zeros.reshape(d_out, d_in // pattern.m, pattern.m).sum(-1)
        assert np.all(per_group == pattern.m - pattern.n)
    elif pattern.scope == "row":
        assert np.all(zeros.sum(1) == math.floor(pattern.sparsity * d_in))
    else:
        # As ``keep_mask`` rounds: ``s * (d_out * d_in)``, not ``(s * d_out) * d_in``.
        assert zeros.sum() == math.floor(pattern.sparsity * (d_out * d_in))


def test_registry_holds_the_baselines():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(METHODS)


@pytest.mark.parametrize(
    "pattern", [Unstructured(0.5, "matrix"), Unstructured(0.6), NM(2, 4)], ids=str
)
def test_sparsegpt_matches_published_reference(pattern):
    # d_in = 96 in blocks of 32: three blocks, so lazy updates between blocks are exercised.
    weight, x = random_layer(16, 96, 400, seed=1, dead=(5, 40))
    result = METHODS["sparsegpt"](problem_of(weight, x), pattern, blocksize=32)
    expected, losses = reference_sparsegpt(weight, x, pattern, blocksize=32)
    pruned = np.asarray(result.weight)
    np.testing.assert_array_equal(pruned == 0, expected == 0)
    np.testing.assert_allclose(pruned, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(result.info["obs_loss"], losses.sum(), rtol=1e-4)
    assert result.info["dead_inputs"] == 2


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_exact_target_counts(name, pattern):
    # 104 columns in blocks of 32: the last block is partial.
    weight, x = random_layer(24, 104, 300, seed=2)
    options = {"blocksize": 32} if name == "sparsegpt" else {}
    result = METHODS[name](problem_of(weight, x), pattern, **options)
    assert result.weight.shape == weight.shape
    assert result.weight.dtype == weight.dtype
    assert_exact_counts(np.asarray(result.weight), pattern)


def test_wanda_scores_and_mask_follow_the_definition():
    weight, x = random_layer(8, 40, 120, seed=3, correlated=True)
    expected = np.abs(weight) * np.linalg.norm(x.astype(np.float64), axis=1)[None, :]
    problem = problem_of(weight, x)
    np.testing.assert_allclose(wanda_scores(problem.weight, problem.gram), expected, rtol=1e-5)

    pruned = np.asarray(METHODS["wanda"](problem, Unstructured(0.6)).weight)
    keep = np.zeros_like(pruned, bool)
    np.put_along_axis(keep, np.argsort(-expected, axis=1)[:, : 40 - 24], True, axis=1)
    np.testing.assert_array_equal(pruned != 0, keep)
    np.testing.assert_array_equal(pruned[keep], weight[keep])  # no weight update


@pytest.mark.parametrize(
    "pattern", [Unstructured(0.6), Unstructured(0.6, "matrix"), NM(2, 4)], ids=str
)
def test_magnitude_keeps_the_largest(pattern):
    weight, x = random_layer(8, 40, 50, seed=4)
    pruned = np.asarray(METHODS["magnitude"](problem_of(weight, x), pattern).weight)
    kept = pruned != 0
    np.testing.assert_array_equal(pruned[kept], weight[kept])
    size = np.abs(weight)
    if isinstance(pattern, NM):
        size, kept = size.reshape(8, 10, 4), kept.reshape(8, 10, 4)
    elif pattern.scope == "matrix":
        size, kept = size.reshape(1, -1), kept.reshape(1, -1)
    smallest_kept = np.where(kept, size, np.inf).min(-1)
    largest_pruned = np.where(kept, -np.inf, size).max(-1)
    assert np.all(smallest_kept > largest_pruned)


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4)], ids=str)
def test_sparsegpt_reconstructs_better_than_mask_only_baselines(pattern):
    weight, x = random_layer(32, 128, 512, seed=5, correlated=True)
    problem = problem_of(weight, x)
    errors = {
        name: reconstruction_error(weight, METHODS[name](problem, pattern).weight, x)
        for name in ("magnitude", "wanda", "sparsegpt")
    }
    assert errors["sparsegpt"] < 0.9 * min(errors["wanda"], errors["magnitude"]), errors


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4)], ids=str)
def test_sparsegpt_eager_equals_jit(pattern):
    weight, x = random_layer(6, 20, 80, seed=6)
    problem = problem_of(weight, x)
    args = (problem.weight, problem.gram, problem.num_tokens, 0.01)
    jitted = sparsegpt_prune(*args, pattern=pattern, blocksize=8)
    with jax.disable_jit():
        eager = sparsegpt_prune(*args, pattern=pattern, blocksize=8)
    np.testing.assert_array_equal(np.asarray(jitted[0]) == 0, np.asarray(eager[0]) == 0)
    for a, b in zip(jitted, eager, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sparsegpt_compiles_once_per_shape():
    first = problem_of(*random_layer(8, 48, 60, seed=7))
    second = problem_of(*random_layer(8, 48, 70, seed=8))
    METHODS["sparsegpt"](first, Unstructured(0.5), blocksize=16)
    size = sparsegpt_prune._cache_size()
    METHODS["sparsegpt"](second, Unstructured(0.5), blocksize=16)
    assert sparsegpt_prune._cache_size() == size


def test_sparsegpt_keeps_low_precision_dtype():
    weight, x = random_layer(8, 32, 60, seed=9)
    problem = problem_of(weight, x)._replace(weight=jnp.asarray(weight, jnp.bfloat16))
    result = METHODS["sparsegpt"](problem, NM(2, 4))
    assert result.weight.dtype == jnp.bfloat16
    assert_exact_counts(np.asarray(result.weight.astype(jnp.float32)), NM(2, 4))


def test_sparsegpt_refuses_misaligned_nm_blocks():
    problem = problem_of(*random_layer(4, 24, 30))
    with pytest.raises(JpruneError, match="multiple of M"):
        METHODS["sparsegpt"](problem, NM(2, 4), blocksize=6)
