"""Contract tests over the method registry: every method, structured included, goes through the
same checks (exact target, determinism, eager == jit, a target that removes nothing, options
refused before any model work). Every method on a 2-device mesh: test_sharding, which runs
the engine on meshes for every method in one subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jprune.config import PruneConfig
from jprune.converters.hf import load_model
from jprune.data import calibration_windows, load_tokenizer, read_text, tokenize
from jprune.engine import EngineOptions, prune_model
from jprune.errors import JpruneError
from jprune.methods import METHODS, Channels, LayerProblem
from jprune.methods.channels import num_removed
from jprune.model import CausalLM, logits, named_arrays
from jprune.options import _hints
from jprune.plan import resolve
from jprune.solvers import NM, Unstructured

from conftest import CALIB_TEXT, CHEAP_OPTIONS, ROOT, STORIES260K

# The prototyping example registers its method on import: it gets every check below.
sys.path.insert(0, str(ROOT / "examples"))
import custom_method  # noqa: E402, F401

ALL = sorted(METHODS)
LAYER_METHODS = sorted(n for n, m in METHODS.items() if not m.structured)
STRUCTURED = sorted(n for n, m in METHODS.items() if m.structured)


@pytest.fixture(scope="module")
def stories(assets):
    model, config = load_model(STORIES260K)
    ids = calibration_windows(
        tokenize(load_tokenizer(STORIES260K), read_text(CALIB_TEXT)), 4, 32, 0
    )
    return model, config, ids


_FIRST_RUNS: dict = {}


def run(stories, name, target, **options):
    """The engine on a copy of stories260K (the engine prunes in place). The first run of each
    setting is kept, so the determinism check needs one more run, not two."""
    model, config, ids = stories
    method = METHODS[name]
    outcome = prune_model(
        CausalLM(model.spec, named_arrays(model)),
        ids,
        method,
        target,
        # targets, determinism and the engine are under test, not quality: cheapest settings
        method.parse_options({**CHEAP_OPTIONS.get(name, {}), **options}),
        EngineOptions(intra_block=method.intra_block),
        hf_config=config,
    )
    _FIRST_RUNS.setdefault((name, target, tuple(sorted(options.items()))), outcome)
    return outcome


def _linears(model, roles=("q", "k", "v", "o", "gate", "up", "down")):
    arrays = named_arrays(model)
    for i in range(model.spec.num_layers):
        for role in roles:
            yield f"layers.{i}.{role}", np.asarray(arrays[f"layers.{i}.{role}.weight"])


# Through the engine, a covering set of methods x targets rather than all of them (each pair
# compiles its own solvers). Every method meets every pattern at the layer level already
# (test_methods_baselines, test_methods_optimization: exact counts over 5-7 patterns each, and
# the example's mask is wanda's ``keep_mask``). Here every method runs the per-row target (its
# determinism check below reuses the run) and one other, and each other target runs three
# methods, fista's intra-block stages and the one-pass engine among them. A method not listed
# (a new one) runs every target.
MATRIX, TWO_FOUR = Unstructured(0.5, "matrix"), NM(2, 4)
OTHER_TARGETS = {
    "magnitude": (MATRIX,),
    "fista": (MATRIX,),
    "optima": (MATRIX,),
    "wanda": (TWO_FOUR,),
    "sparsegpt": (TWO_FOUR,),
    "wanda-ridge": (TWO_FOUR,),
}
EXACT_TARGETS = [
    (name, target)
    for name in LAYER_METHODS
    for target in (Unstructured(0.5), *OTHER_TARGETS.get(name, (MATRIX, TWO_FOUR)))
]


@pytest.mark.parametrize(
    ("name", "target"), EXACT_TARGETS, ids=[f"{n}-{t}" for n, t in EXACT_TARGETS]
)
def test_exact_target(stories, name, target):
    model = run(stories, name, target).model
    for layer, weight in _linears(model):
        kept = weight != 0
        if isinstance(target, NM):
            groups = kept.reshape(weight.shape[0], -1, target.m).sum(-1)
            assert (groups == target.n).all(), layer
        elif target.scope == "row":
            pruned = math.floor(target.sparsity * weight.shape[1])
            assert (kept.sum(1) == weight.shape[1] - pruned).all(), layer
        else:
            assert (~kept).sum() == math.floor(target.sparsity * weight.size), layer


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("name", STRUCTURED)
def test_exact_channels(stories, name, attention):
    before = stories[0].spec
    outcome = run(stories, name, Channels(0.25), attention=attention)
    spec = outcome.model.spec
    width = before.intermediate_size - num_removed(0.25, before.intermediate_size)
    for i, block in enumerate(outcome.model.layers):
        assert block.down.weight[...].shape == (before.hidden_size, width), i
        assert block.up.weight[...].shape == (width, before.hidden_size), i
        v_width = before.head_dim - (num_removed(0.25, before.head_dim) if attention else 0)
        assert block.v.weight[...].shape[0] == spec.num_kv_heads * v_width, i
    channels = [r["channels"] for r in outcome.records]
    assert all(c["after"] == c["before"] - num_removed(0.25, c["before"] // g) * g
               for c, g in zip(channels, _groups(outcome.records, spec), strict=True))  # fmt: skip


def _groups(records, spec):
    return [spec.num_kv_heads if r["role"] == "attention" else 1 for r in records]


def _target_for(name):
    return Channels(0.25) if METHODS[name].structured else Unstructured(0.5)


@pytest.mark.parametrize("name", ALL)
def test_deterministic(stories, name):
    target = _target_for(name)
    keys = [(name, target, ()), (name, target, (("attention", False),))]
    first = next((_FIRST_RUNS[k] for k in keys if k in _FIRST_RUNS), None)
    first = first or run(stories, name, target)
    first, second = named_arrays(first.model), named_arrays(run(stories, name, target).model)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), key)


@pytest.mark.parametrize("name", ALL)
def test_a_target_that_removes_nothing_leaves_the_model(stories, name):
    """0 channels, or a sparsity whose per-row count rounds to 0 (0.005 of <= 172 inputs)."""
    model, _, ids = stories
    target = Channels(0.0) if METHODS[name].structured else Unstructured(0.005)
    pruned = run(stories, name, target).model
    dense, after = np.asarray(logits(model, ids)), np.asarray(logits(pruned, ids))
    np.testing.assert_array_equal(after, dense)


@pytest.mark.parametrize("name", LAYER_METHODS)
def test_eager_equals_jit(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 200)).astype(np.float32)
    weight = rng.standard_normal((6, 16)).astype(np.float32)
    problem = LayerProblem(jnp.asarray(weight), jnp.asarray(x @ x.T), None, 200, "eager")
    method = METHODS[name]
    # eager runs every solver iteration op by op in Python: the cheapest settings, the same code
    options = {"blocksize": 8} if name == "sparsegpt" else CHEAP_OPTIONS.get(name, {})
    jitted = np.asarray(method(problem, NM(2, 4), **options).weight)
    with jax.disable_jit():
        eager = np.asarray(method(problem, NM(2, 4), **options).weight)
    np.testing.assert_array_equal(eager != 0, jitted != 0)
    np.testing.assert_allclose(eager, jitted, rtol=1e-4, atol=1e-5)


@contextlib.contextmanager
def compilations():
    """The names of the programs XLA compiles inside the block (jax.monitoring's events)."""
    compiled: list[str] = []

    def listen(event, duration, *, fun_name="?", **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize("scope", ["row", "matrix"])
@pytest.mark.parametrize("name", LAYER_METHODS)
def test_exact_counts_share_one_program(name, scope):
    """A layer-wise allocation gives every layer its own zero count: the count is data, so a
    second layer of the same shape with another count runs the programs the first compiled
    (issue 26: OWL compiled one program per count, 2-5x uniform's time) and gets its own
    exact counts."""
    rng = np.random.default_rng(1)
    # A shape of its own per method, so no other test has compiled its programs already.
    d_out, d_in, tokens = 8 + LAYER_METHODS.index(name), 32, 96
    method = METHODS[name]
    options = method.parse_options(CHEAP_OPTIONS.get(name, {}))

    def prune(count):
        x = rng.standard_normal((d_in, tokens)).astype(np.float32)
        weight = rng.standard_normal((d_out, d_in)).astype(np.float32)
        problem = LayerProblem(jnp.asarray(weight), jnp.asarray(x @ x.T), None, tokens, "layer")
        pattern = Unstructured(count / weight.size, scope, count)
        return np.asarray(method(problem, pattern, options).weight)

    first = 14 * d_out
    prune(first)
    second = first + 2 * d_out + 5  # rows differ by one zero: the first five prune one more
    with compilations() as compiled:
        pruned = prune(second)
    assert compiled == [], f"{name} compiled again for a new count: {compiled}"
    zeros = (pruned == 0).sum(axis=1)
    if scope == "row":
        np.testing.assert_array_equal(zeros, 16 + (np.arange(d_out) < 5))
    else:
        assert zeros.sum() == second


def _wrong_value(field, hint):
    """A value of the wrong type (or outside the choices) for an option field."""
    if field.metadata.get("choices") is not None:
        return "no-such-choice"
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is not None else hint
    return "maybe" if base is bool else "not-a-number"


@pytest.mark.parametrize("name", ALL)
def test_bad_options_are_refused_before_any_model_work(name, tmp_path):
    """``resolve`` reads no file: a missing model and calibration text are not reached."""

    def config(options):
        target = {"sparsity": 0.5} if METHODS[name].structured else {"pattern": "2:4"}
        return PruneConfig.of(
            tmp_path / "missing-model", name, calib=tmp_path / "missing.txt",
            method_options=options, **target,
        )  # fmt: skip

    resolve(config({}))  # the defaults are accepted
    with pytest.raises(JpruneError, match=rf"method '{name}' has no option 'no_such_option'"):
        resolve(config({"no_such_option": 1}))
    options = METHODS[name].options
    for field in dataclasses.fields(options):
        hint = _hints(options)[field.name]
        with pytest.raises(JpruneError, match=rf"'{name}' option '{field.name}' must be"):
            resolve(config({field.name: _wrong_value(field, hint)}))
    assert not list(tmp_path.iterdir())


def test_describe_options_lists_every_field_with_its_default():
    for name, method in METHODS.items():
        text = method.describe_options()
        for field in dataclasses.fields(method.options):
            assert f"  {field.name} (" in text and "default" in text, (name, field.name)


def test_the_example_method_runs_through_the_command_line(tmp_path, capsys):
    from jprune.cli import main

    argv = ["prune", "--model", str(STORIES260K), "--method", "wanda-ridge", "--sparsity", "0.5"]
    argv += ["--calib", str(CALIB_TEXT), "--nsamples", "2", "--seqlen", "32", "--quiet"]
    assert main([*argv, "--option", "ridge=0.1", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["target"]["options"] == {"ridge": 0.1, "maxiter": 200}
    assert report["summary"]["sparsity"] == 0.5
    assert main([*argv, "--option", "ridge=-1"]) == 2
    assert "'ridge' must be a number in [0, inf], got '-1'" in capsys.readouterr().err
