"""Optimization-based layer methods: FISTAPruner (``fista``), ``l0-admm`` and OPTIMA.

OPTIMA is checked against an independent float64 NumPy least squares per row on its support;
FISTAPruner and l0-admm against the baselines' reconstruction error on a correlated problem.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from test_methods_baselines import problem_of, random_layer

from jprune.errors import JpruneError
from jprune.methods import METHODS, LayerProblem, corrected_gram
from jprune.solvers import NM, Unstructured, num_pruned

from conftest import CALIB_TEXT, STORIES260K

PATTERNS = [Unstructured(0.5), Unstructured(0.7), Unstructured(0.6, "matrix"), NM(2, 4), NM(4, 8)]


@pytest.fixture(scope="module")
def layer():
    weight, x = random_layer(32, 64, 600, seed=3, correlated=True)
    return weight, x, problem_of(weight, x)


def error(weight, dense, x):
    """``||W X - W0 X||_F^2`` in float64."""
    delta = np.asarray(weight, np.float64) - dense.astype(np.float64)
    return float(np.sum((delta @ x.astype(np.float64)) ** 2))


@pytest.mark.parametrize("method", ["fista", "l0-admm", "optima"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_exact_counts(layer, method, pattern):
    weight, _, problem = layer
    pruned = np.asarray(METHODS[method](problem, pattern).weight)
    assert int((pruned == 0).sum()) == num_pruned(pattern, weight.shape)
    if isinstance(pattern, NM):
        groups = (pruned != 0).reshape(weight.shape[0], -1, pattern.m).sum(-1)
        assert groups.max() <= pattern.n


@pytest.mark.parametrize("mask_from", ["magnitude", "wanda", "sparsegpt"])
def test_optima_is_least_squares_on_its_support(layer, mask_from):
    weight, x, problem = layer
    result = METHODS["optima"](problem, Unstructured(0.6), mask_from=mask_from)
    pruned = np.asarray(result.weight, np.float64)
    x64 = x.astype(np.float64)
    for i in range(weight.shape[0]):
        support = pruned[i] != 0
        target = weight[i].astype(np.float64) @ x64
        row, *_ = np.linalg.lstsq(x64[support].T, target, rcond=None)
        np.testing.assert_allclose(pruned[i, support], row, rtol=2e-3, atol=2e-3)
    selector = METHODS[mask_from](problem, Unstructured(0.6)).weight
    assert error(pruned, weight, x) <= error(selector, weight, x)
    assert result.info["selector"] == mask_from
    assert not result.info["kept_selector"]
    assert result.info["converged"] == 1.0
    # Per token, relative to the size of the linear term.
    assert result.info["kkt"] < 1e-3 * np.abs(weight).max() * np.abs(x).max() ** 2


def test_optima_loose_tolerance_is_no_better(layer):
    weight, x, problem = layer
    tight = METHODS["optima"](problem, NM(2, 4)).weight
    loose = METHODS["optima"](problem, NM(2, 4), tol=1e-2).weight
    assert error(tight, weight, x) <= error(loose, weight, x) * (1 + 1e-6)


@pytest.mark.parametrize("method", ["fista", "l0-admm"])
@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4)], ids=str)
def test_optimization_beats_the_baselines(layer, method, pattern):
    weight, x, problem = layer
    ours = error(METHODS[method](problem, pattern).weight, weight, x)
    for baseline in ("wanda", "sparsegpt"):
        assert ours < error(METHODS[baseline](problem, pattern).weight, weight, x), baseline


def test_l0_admm_is_least_squares_on_its_support(layer):
    """With the refit run to tolerance, each row is the float64 least squares on its support,
    and the info says how the iteration ended."""
    weight, x, problem = layer
    result = METHODS["l0-admm"](problem, Unstructured(0.6), refit_iters=200, refit_tol=1e-7)
    pruned = np.asarray(result.weight, np.float64)
    x64 = x.astype(np.float64)
    for i in range(weight.shape[0]):
        support = pruned[i] != 0
        row, *_ = np.linalg.lstsq(x64[support].T, weight[i].astype(np.float64) @ x64, rcond=None)
        np.testing.assert_allclose(pruned[i, support], row, rtol=2e-3, atol=2e-3)
    assert result.info["iterations"] <= 30 and 0.0 <= result.info["settled"] <= 1.0
    assert sum(result.info["result"].values()) == weight.shape[0]
    assert result.info["result"]["nonfinite"] == 0


def test_fista_pursuit_still_runs(layer):
    """The pursuit of the old defaults stays an option, and only ever lowers the error."""
    weight, x, problem = layer
    pattern = Unstructured(0.5)
    plain = METHODS["fista"](problem, pattern, polish_iters=0)
    pursued = METHODS["fista"](problem, pattern, polish_iters=0, pursuit_steps=3, pursuit_cg=8)
    assert pursued.info["pursuit_steps_used"] >= 0 and "polish_error" not in pursued.info
    assert int((np.asarray(pursued.weight) == 0).sum()) == num_pruned(pattern, weight.shape)
    assert error(pursued.weight, weight, x) <= error(plain.weight, weight, x) * (1 + 1e-5)


def test_fista_without_refit_is_the_lam_search(layer):
    weight, x, problem = layer
    pattern = Unstructured(0.5)
    plain = METHODS["fista"](problem, pattern, refit=False)
    refit = METHODS["fista"](problem, pattern)
    assert int((np.asarray(plain.weight) == 0).sum()) == num_pruned(pattern, weight.shape)
    assert np.isfinite(error(plain.weight, weight, x))
    assert plain.info["lam"] > 0 and "pursuit_steps_used" not in plain.info
    # The rounded lasso answer is shrunk; refitting its mask can only help.
    assert error(refit.weight, weight, x) < error(plain.weight, weight, x)


def test_fista_warm_start_competes(layer):
    weight, x, problem = layer
    pattern = Unstructured(0.7)
    warm = METHODS["fista"](problem, pattern, warm_start="sparsegpt").weight
    assert int((np.asarray(warm) == 0).sum()) == num_pruned(pattern, weight.shape)
    sparsegpt = METHODS["sparsegpt"](problem, pattern).weight
    assert error(warm, weight, x) <= error(sparsegpt, weight, x) * (1 + 1e-6)


@pytest.mark.parametrize("correction", [0.0, 0.25, 1.0])
def test_fista_correction_is_least_squares_to_the_blended_target(correction):
    """On its kept support each row fits ``W0 (Xp + c (X - Xp))``: a float64 lstsq per row.

    Compared by the residual each row leaves (the inputs are ill-conditioned, so the weights
    themselves are determined only loosely), and against the other corrections' answers.
    """
    weight, x = random_layer(16, 48, 500, seed=5, correlated=True)
    rng = np.random.default_rng(6)
    # The pruned model's inputs: the dense ones plus an upstream error correlated with them.
    xp = (x + 0.3 * (rng.standard_normal((48, 48)) / np.sqrt(48)) @ x).astype(np.float32)
    x64, xp64 = x.astype(np.float64), xp.astype(np.float64)
    problem = LayerProblem(
        jnp.asarray(weight),
        jnp.asarray((xp64 @ xp64.T).astype(np.float32)),
        jnp.asarray((x64 @ xp64.T).astype(np.float32)),
        x.shape[1],
        "test",
    )
    # The final refit run to a tight tolerance (the default, 30 CG steps to 1e-5 from the
    # polish's unrefit support, leaves these ill-conditioned rows within ~2e-4 of their
    # least squares).
    exact = {"correction": correction, "refit_iters": None, "refit_tol": 1e-7}
    pruned = np.asarray(METHODS["fista"](problem, Unstructured(0.5), **exact).weight)
    target = weight.astype(np.float64) @ (xp64 + correction * (x64 - xp64))
    for i in range(weight.shape[0]):
        support = pruned[i] != 0
        row, *_ = np.linalg.lstsq(xp64[support].T, target[i], rcond=None)
        best = np.sum((row @ xp64[support] - target[i]) ** 2)
        got = np.sum((pruned[i].astype(np.float64) @ xp64 - target[i]) ** 2)
        assert got <= best * (1 + 1e-4) + 1e-9 * np.sum(target[i] ** 2), i
    # The blended target is what the answer is closest to: another correction's answer
    # leaves a larger residual against it.
    other = 1.0 if correction < 0.5 else 0.0
    elsewhere = METHODS["fista"](
        problem, Unstructured(0.5), **(exact | {"correction": other})
    ).weight
    residual = lambda w: np.sum((np.asarray(w, np.float64) @ xp64 - target) ** 2)  # noqa: E731
    assert residual(pruned) < residual(elsewhere)


def test_corrected_gram_blends_the_linear_term(layer):
    weight, x, _ = layer
    gram, cross = jnp.eye(4) * 2.0, jnp.ones((4, 4))
    assert corrected_gram(gram, cross, 1.0) is cross
    assert corrected_gram(gram, cross, 0.0) is gram
    np.testing.assert_allclose(corrected_gram(gram, cross, 0.25), 0.25 * cross + 0.75 * gram)
    assert corrected_gram(gram, None, 0.25) is gram  # no dense stream: nothing to correct
    with pytest.raises(JpruneError, match="correction"):
        METHODS["fista"](problem_of(weight, x), NM(2, 4), correction=1.5)


def test_unknown_options_raise(layer):
    problem = layer[2]
    with pytest.raises(JpruneError, match="mask_from"):
        METHODS["optima"](problem, NM(2, 4), mask_from="obs")
    with pytest.raises(JpruneError, match="warm_start"):
        METHODS["fista"](problem, NM(2, 4), warm_start="optima")


def test_end_to_end_2of4(tmp_path):
    if not STORIES260K.is_dir():
        pytest.skip("stories260K not available")
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import prune_with

    for method in ("fista", "optima"):
        out = tmp_path / method
        prune_with(
            STORIES260K, method, pattern="2:4", calib=CALIB_TEXT, nsamples=8, seqlen=128, out=out
        )
        model = AutoModelForCausalLM.from_pretrained(out)
        linears = [
            (name, module.weight.detach())
            for name, module in model.model.layers.named_modules()
            if isinstance(module, torch.nn.Linear)
        ]
        assert len(linears) == 7 * model.config.num_hidden_layers
        for name, w in linears:
            groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert int(groups.max()) <= 2 and int((w == 0).sum()) == w.numel() // 2, name
