"""The block-reconstruction stage (jprune.reconstruct): its gradient, its masks, its identities.

Its resume check is in test_streaming.py (the killed-run fixture lives there); its mesh check
runs here in an 8-virtual-device subprocess like test_sharding's.
"""

import json
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

import jprune.model as model_module
from jprune.config import PruneConfig
from jprune.converters.hf import load_model
from jprune.errors import JpruneError
from jprune.plan import resolve
from jprune.reconstruct import gradient, relative_output_error
from jprune.walk import BlockWeights

from conftest import (
    CALIB_TEXT,
    EVAL_TEXT,
    ROOT,
    STORIES260K,
    assert_exact_pattern,
    prune_with,
    run_on_eight_devices,
)

STAGE = {
    "enabled": True,
    "steps": 6,
    "learning_rate": 1e-3,
    "eval_every": 2,
    "holdout": 2,
    "windows": 2,
}
CALIBRATION = {"nsamples": 8, "seqlen": 64}


# ---------------------------------------------------------------- the gradient


def _reference_loss(graphdef, state, x, y):
    """The stage's default loss written out: the windows' mean relative output error."""
    out = nnx.merge(graphdef, state)(x)[0]
    per_window = jnp.sum((out - y) ** 2, axis=(1, 2)) / jnp.sum(y**2, axis=(1, 2))
    return jnp.mean(per_window)


def test_the_stage_gradient_matches_central_differences_in_float64(assets, monkeypatch):
    """Block 0 of stories260K in float64 (the model computes in float32 by default: the
    compute dtype is widened for this test). A central difference with step h errs by
    O(h^2 |f'''|) + O(eps64 |f| / h): about 1e-10 relative at h = 1e-5, so 1e-6 holds with
    a wide margin, and float32 (eps 1e-7, error ~1e-2 at that step) could not pass it."""
    with jax.enable_x64(True):
        monkeypatch.setattr(model_module, "COMPUTE_DTYPE", jnp.float64)
        model, _ = load_model(STORIES260K)
        graphdef, state = nnx.split(model.layers[0])
        state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, 16, model.spec.hidden_size)))
        # targets near the outputs, as a pruned block's are: a loss of order 1e-2
        out = nnx.merge(graphdef, state)(x)[0]
        y = out + 0.1 * jnp.asarray(rng.standard_normal(out.shape)) * jnp.std(out)
        loss, grads = gradient(BlockWeights(graphdef, state), x, y)
        assert float(loss) == pytest.approx(float(_reference_loss(graphdef, state, x, y)), 1e-12)
        # the trained leaves: every linear's weight, no norm (not asked), no embedding
        assert set(grads) == {f"{n}.weight" for n in ("q", "k", "v", "o", "gate", "up", "down")}
        flat = nnx.to_flat_state(state)
        direction = {n: jnp.asarray(rng.standard_normal(g.shape)) for n, g in grads.items()}
        norm = np.sqrt(sum(float(jnp.sum(d**2)) for d in direction.values()))
        direction = {n: d / norm for n, d in direction.items()}  # a unit step: h is the step

        def moved(step):
            leaves = []
            for path, var in flat:
                name = ".".join(str(k) for k in path)
                value = var[...] + step * direction[name] if name in direction else var[...]
                leaves.append((path, var.replace(value)))
            return nnx.from_flat_state(leaves)

        h = 1e-5
        central = (
            _reference_loss(graphdef, moved(h), x, y) - _reference_loss(graphdef, moved(-h), x, y)
        ) / (2 * h)
        analytic = sum(float(jnp.vdot(grads[n], direction[n])) for n in grads)
        assert analytic == pytest.approx(float(central), rel=1e-6)
        # and one coordinate of each linear alone
        for name, g in grads.items():
            i, j = np.unravel_index(int(jnp.argmax(jnp.abs(g))), g.shape)
            one = jnp.zeros(g.shape).at[i, j].set(1.0)
            saved, direction = direction, {name: one}
            delta = _reference_loss(graphdef, moved(h), x, y) - _reference_loss(
                graphdef, moved(-h), x, y
            )
            direction = saved
            assert float(g[i, j]) == pytest.approx(float(delta) / (2 * h), rel=1e-6), name


def test_the_default_objective_is_the_relative_error():
    y = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    assert float(relative_output_error(y, y)) == 0.0
    assert float(relative_output_error(2 * y, y)) == pytest.approx(1.0)


# ---------------------------------------------------------------- the stage in a run


def _run(tmp_path, name, method, **settings):
    out = tmp_path / name
    report = prune_with(
        STORIES260K, method, calib=CALIB_TEXT, **CALIBRATION, out=out, evaluate_dense=False,
        **settings,
    )  # fmt: skip
    return out, report


def _shards(path):
    """Each safetensors file of a checkpoint, byte for byte."""
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.safetensors"))}


def _tensors(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {n: t.numpy() for n, t in model.state_dict().items()}


@pytest.mark.parametrize(
    "method, target",
    [
        ("sparsegpt", {"sparsity": 0.5}),
        ("sparsegpt", {"pattern": "2:4"}),
        ("wanda-sp", {"sparsity": 0.25}),
    ],
)
def test_the_stage_keeps_every_pruned_weight_zero_and_every_count(assets, tmp_path, method, target):
    plain, _ = _run(tmp_path, "plain", method, **target)
    staged, report = _run(tmp_path, "staged", method, **target, reconstruction=STAGE)
    if "pattern" in target:
        assert_exact_pattern(staged, nm=(2, 4))
    elif method == "sparsegpt":
        assert_exact_pattern(staged, sparsity=target["sparsity"])
    before, after = _tensors(plain), _tensors(staged)
    assert before.keys() == after.keys()
    for name, weight in before.items():
        assert after[name].shape == weight.shape, name  # structured: as many channels
        if "layers" not in name or "norm" in name:
            np.testing.assert_array_equal(after[name], weight, err_msg=name)  # not trained
        elif "layers.0." in name:
            # Block 0 sees the same inputs in both runs, so the same layer solves: the stage
            # moved its kept weights and left every zero a zero. (Later blocks see the
            # reconstructed block's outputs, so their masks are their own: the exact counts
            # above are what holds there.)
            assert (after[name][weight == 0] == 0).all(), name
            assert (after[name] != weight).any(), name
    blocks = report["reconstruction"]["blocks"]
    assert [b["block"] for b in blocks] == list(range(5))
    assert blocks[0]["best_step"] > 0
    improved = [b for b in blocks if b["best_step"] > 0]
    assert all(b["held_out_after"] < b["held_out_before"] for b in improved)
    assert report["config"]["reconstruction"]["steps"] == STAGE["steps"]
    assert report["reconstruction"]["objective"].endswith("relative_output_error")


def test_a_stage_that_cannot_move_leaves_the_checkpoint_bit_for_bit(assets, tmp_path):
    """The stage off is no stage; on with 0 steps it measures the held-out windows only; on
    with a zero learning rate it runs every step and every held-out measurement and finds no
    better iterate. Each must leave the layer solves' bits."""
    plain, _ = _run(tmp_path, "plain", "sparsegpt", sparsity=0.5)
    expected = _shards(plain)
    for name, stage in {
        "off": {**STAGE, "enabled": False},
        "zero steps": {**STAGE, "steps": 0},
        "zero rate": {**STAGE, "learning_rate": 0.0},
    }.items():
        out, report = _run(tmp_path, name, "sparsegpt", sparsity=0.5, reconstruction=stage)
        assert _shards(out) == expected, name
        if stage["enabled"]:
            assert all(b["best_step"] == 0 for b in report["reconstruction"]["blocks"])
        else:
            assert report["reconstruction"] is None


def test_the_target_correction_defaults_to_the_methods():
    def plan(method, **stage):
        config = PruneConfig.of(
            STORIES260K, method, sparsity=0.5, calib=CALIB_TEXT, reconstruction=stage
        )
        return resolve(config).config.reconstruction

    assert plan("fista", enabled=True).correction == 0.25  # fista's own default
    assert plan("fista", enabled=True, correction=0.5).correction == 0.5
    assert plan("sparsegpt", enabled=True).correction == 0.0
    with pytest.raises(JpruneError, match="holds out 8 of 8 calibration windows"):
        resolve(
            PruneConfig.of(
                STORIES260K,
                "sparsegpt",
                sparsity=0.5,
                calib=CALIB_TEXT,
                nsamples=8,
                reconstruction={"enabled": True, "holdout": 8},
            )  # fmt: skip
        )
    with pytest.raises(JpruneError, match="correction"):
        PruneConfig.of(
            STORIES260K, "sparsegpt", sparsity=0.5, calib=CALIB_TEXT,
            reconstruction={"correction": 2.0},
        )  # fmt: skip


def test_the_correcting_target_reads_the_dense_stream(assets, tmp_path):
    """With a correction the target moves toward the dense model's stream: another fit."""
    _, plain = _run(tmp_path, "c0", "sparsegpt", sparsity=0.5, reconstruction=STAGE)
    _, corrected = _run(
        tmp_path, "c1", "sparsegpt", sparsity=0.5, reconstruction={**STAGE, "correction": 1.0}
    )
    first = [b["held_out_before"] for b in plain["reconstruction"]["blocks"]]
    second = [b["held_out_before"] for b in corrected["reconstruction"]["blocks"]]
    assert first[0] == second[0]  # block 0: both models' inputs are the embeddings
    assert first[1:] != second[1:]


def test_the_example_objective_runs(assets, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import block_objective
    finally:
        sys.path.remove(str(ROOT / "examples"))
    report = block_objective.main(
        [
            "--model", str(STORIES260K), "--calib", str(CALIB_TEXT), "--eval", str(EVAL_TEXT),
            "--sparsity", "0.6", "--steps", "6", "--nsamples", "8", "--seqlen", "64",
            "--out", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    assert report["reconstruction"]["objective"].endswith("normalized_output_error")
    assert any(b["best_step"] > 0 for b in report["reconstruction"]["blocks"])
    assert_exact_pattern(tmp_path / "out", sparsity=0.6)


# ---------------------------------------------------------------- meshes

MESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    import jprune.prune as jp
    from jprune.config import PruneConfig

    model, calib, out = sys.argv[1:4]
    stage = json.loads(sys.argv[4])
    assert jax.device_count() == 8
    results = {}
    for mesh, row_blocks in ((1, 8), (8, 8), (8, 0)):
        report = jp.prune(PruneConfig.of(
            model, "sparsegpt", sparsity=0.5, calib=calib, nsamples=8, seqlen=64, mesh=mesh,
            row_blocks=row_blocks, out=f"{out}/mesh{mesh}-rows{row_blocks}",
            evaluate_dense=False, reconstruction=stage,
        ))
        results[f"{mesh}-{row_blocks}"] = report["reconstruction"]["blocks"]
    print(json.dumps(results))
    """
)


def test_the_stage_gives_one_devices_weights_on_eight_in_the_reproducible_mode(assets, tmp_path):
    results = run_on_eight_devices(tmp_path, MESH_SCRIPT, STORIES260K, CALIB_TEXT, tmp_path,
                                   json.dumps(STAGE))  # fmt: skip
    one, eight = _tensors(tmp_path / "mesh1-rows8"), _tensors(tmp_path / "mesh8-rows8")
    unequal = {n: int((t != eight[n]).sum()) for n, t in one.items()}
    assert sum(unequal.values()) == 0, unequal

    def timeless(blocks):
        return [{k: v for k, v in b.items() if k != "seconds"} for b in blocks]

    assert timeless(results["1-8"]) == timeless(results["8-8"])
    assert any(b["best_step"] > 0 for b in results["1-8"])
    # the default mode on 8 devices: gradients reduced across them, the same fit up to round-off
    for ours, theirs in zip(results["8-0"], results["1-8"], strict=True):
        assert ours["held_out_after"] == pytest.approx(theirs["held_out_after"], rel=0.05)


def test_the_stage_follows_a_layer_wise_allocation(assets, tmp_path):
    """OWL gives each block its own sparsity; the stage keeps every layer's allocated count."""
    out, report = _run(
        tmp_path, "owl", "sparsegpt", sparsity=0.5, allocation={"method": "owl"},
        reconstruction=STAGE,
    )  # fmt: skip
    allocated = report["allocation"]["layers"]
    weights = dict(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict())
    module = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}  # fmt: skip
    assert len(allocated) == 5 * 7
    assert len({layer["sparsity"] for layer in allocated.values()}) > 1  # not uniform
    for name, layer in allocated.items():
        _, block, role = name.split(".")
        weight = weights[f"model.layers.{block}.{module[role]}.weight"]
        assert int((weight == 0).sum()) == layer["pruned"], name
    assert report["reconstruction"]["blocks"][0]["best_step"] > 0
