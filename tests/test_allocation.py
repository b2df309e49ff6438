"""Layer-wise sparsity allocation: exact budgets, OWL's formula, the optimal allocation against
brute force and against uniform, the exact-count patterns, and a whole run."""

import itertools
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jprune.allocation import (
    LayerMeasure,
    allocate,
    apportion,
    envelope_value,
    grid_patterns,
    layer_errors,
    optimal_counts,
    outlier_ratio,
    owl_sparsities,
    plan,
)
from jprune.config import AllocationConfig, PruneConfig
from jprune.errors import JpruneError
from jprune.methods import METHODS, LayerProblem
from jprune.plan import resolve
from jprune.solvers import Unstructured, keep_mask, num_pruned, rows_pattern
from jprune.staging import describe_difference

from conftest import STORIES260K, prune_with

SMALL = dict(nsamples=8, seqlen=128, seed=0)


# ---------------------------------------------------------------- OWL by hand


def test_owl_reproduces_the_papers_formula_on_a_hand_computed_case():
    # Outlier ratios (percent, as OWL's code keeps them) of four equal blocks, target 0.7,
    # lambda 0.08: (D - 1) / 4 * 0.16 = [0, .04, .08, .16], mean .07, so the density is
    # 0.3 + [-.07, -.03, .01, .09] and the sparsity 0.7 - that deviation.
    found = owl_sparsities([1.0, 2.0, 3.0, 5.0], [10, 10, 10, 10], 0.7, 0.08)
    np.testing.assert_allclose(found, [0.77, 0.73, 0.69, 0.61], atol=1e-12)
    # OWL's own lines (lib/prune.py, prune_wanda_outlier), transcribed:
    ratio = np.array([1.0, 2.0, 3.0, 5.0])
    ratio = (ratio - ratio.min()) * (1 / (ratio.max() - ratio.min()) * 0.08 * 2)
    ratio = ratio - np.mean(ratio) + (1 - 0.7)
    np.testing.assert_allclose(found, 1 - ratio, atol=1e-12)
    # the outlier ratio: scores above M times the mean of all the block's scores
    scores = [jnp.array([[1.0, 1.0, 1.0, 9.0]]), jnp.array([[1.0, 1.0], [1.0, 1.0]])]
    # mean 17 / 8 = 2.125; with M = 4 only the 9 is above 8.5
    assert outlier_ratio(scores, 4.0) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 5.0) == 0.0
    # equal ratios: uniform; a lambda that leaves (0, 1): refused
    np.testing.assert_allclose(owl_sparsities([2.0, 2.0], [1, 1], 0.6, 0.08), [0.6, 0.6])
    with pytest.raises(JpruneError, match="outside"):
        owl_sparsities([1.0, 2.0], [1, 1], 0.95, 0.2)


def test_apportion_hits_the_budget_and_stays_within_one_of_each_target():
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(100, 5000, size=12)
        real = rng.uniform(0.5, 0.8, size=12) * sizes
        budget = int(real.sum() * rng.uniform(0.98, 1.0))
        counts = apportion(real, budget, sizes)
        assert counts.sum() == budget and counts.dtype == np.int64
        assert np.all(np.abs(counts - real * budget / real.sum()) < 1)


# ---------------------------------------------------------------- the optimal allocation


def _brute_force(counts, errors, budget):
    """min sum_l envelope_l(c_l) over every integer allocation with sum c_l = budget."""
    best = math.inf
    ranges = [range(int(c[0]), int(c[-1]) + 1) for c in counts]
    for choice in itertools.product(*ranges):
        if sum(choice) == budget:
            value = sum(envelope_value(counts[l], errors[l], c) for l, c in enumerate(choice))
            best = min(best, value)
    return best


def test_optimal_counts_match_brute_force_and_carry_a_tight_certificate():
    rng = np.random.default_rng(1)
    for _ in range(20):
        layers = 3
        counts = np.array([[0, 2, 4, 6, 8]] * layers) + rng.integers(0, 3, size=(layers, 1))
        # increasing, not always convex: the envelope must skip the dents
        errors = np.cumsum(rng.uniform(0.0, 1.0, size=(layers, 5)), axis=1)
        budget = int(counts[:, 2].sum())
        chosen, certificate = optimal_counts(counts, errors, budget, 2)
        assert chosen.sum() == budget
        assert certificate.objective == pytest.approx(
            _brute_force(counts, errors, budget), abs=1e-9
        )
        assert certificate.lower_bound <= certificate.objective + 1e-9
        assert certificate.gap == pytest.approx(0.0, abs=1e-9)
        assert certificate.objective <= certificate.uniform + 1e-12
        # all layers but at most one sit on a measured count
        off_grid = [c not in row for c, row in zip(chosen, counts, strict=True)]
        assert sum(off_grid) <= 1


def _layers(seed, shapes):
    """Weights and Grams whose error curves differ from layer to layer."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (d_out, d_in) in enumerate(shapes):
        x = rng.standard_normal((d_in, 4 * d_in)) * rng.uniform(0.2, 3.0, size=(d_in, 1)) ** (i % 3)
        w = rng.standard_normal((d_out, d_in)) * (1 + 4 * (rng.uniform(size=(d_out, d_in)) < 0.02))
        out.append((jnp.asarray(w, jnp.float32), jnp.asarray(x @ x.T, jnp.float32)))
    return out


@pytest.mark.parametrize("estimate", ["obs", "mask"])
@pytest.mark.parametrize("scope", ["row", "matrix"])
def test_optimal_summed_error_is_at_most_uniforms_on_the_same_grams(estimate, scope):
    shapes = [(24, 32), (48, 32), (32, 48), (24, 32), (16, 64)]
    target = Unstructured(0.6, scope)
    settings = AllocationConfig(method="optimal", estimate=estimate, spread=0.15, points=5)
    measures = []
    for i, (w, h) in enumerate(_layers(3, shapes)):
        patterns = grid_patterns(target, tuple(w.shape), settings.spread, settings.points)
        errors = layer_errors(w, h, patterns, estimate)
        measures.append(
            LayerMeasure(f"layers.{i}.q", i, tuple(w.shape), tuple(p.count for p in patterns),
                         tuple(errors.tolist()))
        )  # fmt: skip
    report = plan(measures, [], target, settings)
    counts = [report["layers"][m.name]["pruned"] for m in measures]
    assert sum(counts) == sum(num_pruned(target, s) for s in shapes) == report["budget"]
    # the error of the layers actually pruned at these counts, not the interpolation
    optimal = uniform = 0.0
    for (w, h), count in zip(_layers(3, shapes), counts, strict=True):
        size = w.shape[0] * w.shape[1]
        optimal += layer_errors(w, h, [Unstructured(count / size, scope, count)], estimate)[0]
        uniform += layer_errors(w, h, [target], estimate)[0]
    assert optimal <= uniform
    assert report["certificate"]["objective"] <= report["certificate"]["uniform"]
    assert len(set(counts)) > 1  # the curves differ, so the allocation is not uniform


# ---------------------------------------------------------------- exact-count patterns


@pytest.mark.parametrize("scope", ["row", "matrix"])
def test_exact_count_patterns_give_exact_counts_in_every_method(scope):
    rng = np.random.default_rng(0)
    d_out, d_in = 12, 32
    x = rng.standard_normal((d_in, 256))
    problem = LayerProblem(
        jnp.asarray(rng.standard_normal((d_out, d_in)), jnp.float32),
        jnp.asarray(x @ x.T, jnp.float32),
        None,
        256,
    )
    count = 197  # not a multiple of d_out: rows differ by one zero
    pattern = Unstructured(count / (d_out * d_in), scope, count)
    mask = keep_mask(jnp.abs(problem.weight), pattern)
    assert int(jnp.sum(~mask)) == count == num_pruned(pattern, (d_out, d_in))
    if scope == "row":
        per_row = np.asarray(jnp.sum(~mask, axis=1))
        assert per_row.max() - per_row.min() == 1
    for name, options in (
        ("magnitude", {}),
        ("wanda", {}),
        ("sparsegpt", {"blocksize": 8}),
        ("fista", {"num_bisect": 4, "maxiter": 10, "pursuit_steps": 2}),
    ):
        weight = METHODS[name](problem, pattern, **options).weight
        assert int(jnp.sum(weight == 0)) == count, name


@pytest.mark.parametrize(("blocks", "rows"), [(1, 10), (2, 10), (4, 12), (3, 12)])
def test_rows_pattern_gives_a_row_block_its_rows_share(blocks, rows):
    """Rows solved in blocks (the reproducible mode, a mesh's padded rows) keep the zeros the
    whole matrix gives them; ``rows`` past the 10 real ones are zero padding."""
    d_out, d_in, count = 10, 12, 67  # 6 zeros per row, the first 7 rows one more
    scores = np.random.default_rng(0).standard_normal((rows, d_in)).astype(np.float32)
    pattern = Unstructured(count / (d_out * d_in), "row", count)
    whole = np.asarray(keep_mask(jnp.asarray(scores[:d_out]), pattern))
    size, parts = rows // blocks, []
    for start in range(0, rows, size):
        part = rows_pattern(pattern, (d_out, d_in), start, start + size)
        parts.append(np.asarray(keep_mask(jnp.asarray(scores[start : start + size]), part)))
    np.testing.assert_array_equal(np.concatenate(parts)[:d_out], whole)
    assert rows_pattern(Unstructured(0.5), (d_out, d_in), 0, 5) == Unstructured(0.5)
    with pytest.raises(ValueError, match="couples the rows"):
        rows_pattern(Unstructured(count / 120, "matrix", count), (d_out, d_in), 0, 5)


# ---------------------------------------------------------------- refusals and resume


def test_allocation_is_refused_for_nm_patterns_and_structured_methods(assets):
    def config(method, **target):
        return PruneConfig.of(
            STORIES260K, method, calib="c.txt", allocation={"method": "owl"}, **target
        )

    with pytest.raises(JpruneError, match="N:M pattern 2:4 keeps 2 of every 4"):
        resolve(config("wanda", pattern="2:4"))
    with pytest.raises(JpruneError, match="unstructured methods; fasp removes channels"):
        resolve(config("fasp", sparsity=0.2))
    with pytest.raises(JpruneError, match="allocation has no option .lamda."):
        PruneConfig.from_dict({"allocation": {"lamda": 0.1}})
    with pytest.raises(JpruneError, match="odd"):
        resolve(
            PruneConfig.of(
                STORIES260K, "wanda", sparsity=0.5, calib="c.txt",
                allocation={"method": "optimal", "points": 4},
            )
        )  # fmt: skip


def test_a_resume_reuses_the_journal_allocation_and_refuses_another(monkeypatch):
    class Journal:
        def __init__(self):
            self.kept = {}

        def recall(self, key):
            return self.kept.get(key)

        def remember(self, key, value):
            self.kept[key] = value

    stored = {
        "method": "owl",
        "layers": {"layers.0.q": {"pruned": 5, "size": 16, "sparsity": 5 / 16}},
    }
    journal = Journal()
    journal.remember("allocation", stored)

    def no_pass(*args, **kwargs):
        raise AssertionError("a resumed run measured the dense model again")

    monkeypatch.setattr("jprune.allocation.measure", no_pass)
    target = Unstructured(0.3)
    found = allocate(None, None, target, AllocationConfig(method="owl"), None, journal)
    assert found.patterns == {"layers.0.q": Unstructured(5 / 16, "row", 5)}
    # the fingerprint includes the allocation settings: another one is named
    a = {"format": 1, "settings": {"allocation": {"method": "owl"}}}
    b = {"format": 1, "settings": {"allocation": {"method": "optimal"}}}
    assert describe_difference(a, b) == "setting allocation.method was 'owl', now 'optimal'"


# ---------------------------------------------------------------- a whole run


@pytest.mark.parametrize("allocation", ["owl", "optimal"])
def test_a_run_prunes_exactly_the_uniform_count_with_per_layer_sparsities(
    assets, tmp_path, allocation
):
    from jprune.converters.hf import Checkpoint

    from conftest import CALIB_TEXT

    out = tmp_path / allocation
    report = prune_with(
        STORIES260K, "wanda", sparsity=0.6, calib=CALIB_TEXT, **SMALL, out=out,
        evaluate_dense=False, allocation={"method": allocation, "owl_lambda": 0.1},
    )  # fmt: skip
    layers = report["allocation"]["layers"]
    assert len(layers) == 5 * 7
    checkpoint = Checkpoint(out)
    zeros = budget = 0
    sparsities = set()
    for i in range(5):
        arrays = checkpoint.block(i)
        for role in ("q", "k", "v", "o", "gate", "up", "down"):
            weight = np.asarray(arrays[f"layers.{i}.{role}.weight"])
            pruned = int(np.sum(weight == 0))
            assert pruned == layers[f"layers.{i}.{role}"]["pruned"]
            zeros += pruned
            budget += num_pruned(Unstructured(0.6), weight.shape)
            sparsities.add(round(pruned / weight.size, 4))
    assert zeros == budget == report["allocation"]["budget"]
    assert len(sparsities) > 1
    saved = json.loads((out / "report.json").read_text())
    assert saved["config"]["allocation"]["method"] == allocation


def test_the_command_line_refuses_allocation_with_nm_in_one_line(assets, tmp_path, capsys):
    from jprune.cli import main

    from conftest import CALIB_TEXT

    command = [
        "prune",
        "--model",
        str(STORIES260K),
        "--method",
        "wanda",
        "--calib",
        str(CALIB_TEXT),
    ]
    assert main([*command, "--pattern", "2:4", "--allocation", "optimal"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("jprune: error: --allocation optimal needs --sparsity") and "\n" not in err
    )
    assert main([*command, "--sparsity", "0.5", "--allocation", "owl", "--owl-lambda", "0.9"]) == 2
    assert "owl_lambda" in capsys.readouterr().err


def test_residual_weights_are_each_sublayers_update_share_measured_by_transformers(assets):
    """``weight="residual"``: every attention linear of block b carries the mean over tokens of
    ``||o_proj output||^2 / ||block input||^2``, every MLP linear ``||down_proj output||^2 /
    ||block input + o_proj output||^2`` (LLaMA: no post-sublayer norms), recomputed here from
    transformers' own modules through hooks."""
    import torch
    from transformers import AutoModelForCausalLM

    from jprune.allocation import measure
    from jprune.blocks import CheckpointBlocks
    from jprune.converters.hf import Checkpoint
    from jprune.engine import EngineOptions

    rng = np.random.default_rng(0)
    checkpoint = Checkpoint(STORIES260K)
    calibration = rng.integers(0, checkpoint.spec.vocab_size, size=(3, 48)).astype(np.int32)
    settings = AllocationConfig(method="optimal", weight="residual")
    layers, _ = measure(
        CheckpointBlocks(checkpoint), calibration, Unstructured(0.5), settings,
        EngineOptions(batch_size=2),
    )  # fmt: skip

    model = AutoModelForCausalLM.from_pretrained(STORIES260K, torch_dtype=torch.float32).eval()
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = output

        return hook

    def keep_input(name):
        def hook(module, args, kwargs):
            seen[name] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return hook

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.register_forward_hook(keep(f"{i}.o"))
        layer.mlp.down_proj.register_forward_hook(keep(f"{i}.down"))
        layer.register_forward_pre_hook(keep_input(f"{i}.x"), with_kwargs=True)
    with torch.no_grad():
        model(torch.as_tensor(calibration, dtype=torch.long))

    def share(update, stream):
        update, stream = update.double().numpy(), stream.double().numpy()
        return float(np.mean(np.sum(update**2, -1) / np.sum(stream**2, -1)))

    by_name = {lm.name: lm.weight for lm in layers}
    for i in range(checkpoint.spec.num_layers):
        x = seen[f"{i}.x"]
        attention = seen[f"{i}.o"]
        expected_attention = share(attention, x)
        expected_mlp = share(seen[f"{i}.down"], x + attention)
        for role in ("q", "k", "v", "o"):
            assert by_name[f"layers.{i}.{role}"] == pytest.approx(expected_attention, rel=1e-4)
        for role in ("gate", "up", "down"):
            assert by_name[f"layers.{i}.{role}"] == pytest.approx(expected_mlp, rel=1e-4)
    # the weights differ between sublayers, so they change what the knapsack weighs
    assert len({round(w, 6) for w in by_name.values()}) > 2
