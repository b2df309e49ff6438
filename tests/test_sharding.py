"""Sharded pruning gives the single-device answer.

The check runs in a subprocess with 8 virtual CPU devices (XLA_FLAGS must be set before JAX
starts, and the rest of the suite keeps its single device)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from jprune.converters.hf import read_tensors
from jprune.methods import METHODS
from jprune.sharding import make_mesh, pad_rows
from jprune.walk import accumulate_grams

from conftest import (
    CALIB_TEXT,
    CHEAP_OPTIONS,
    ROOT,
    STORIES260K,
    assert_exact_pattern,
    decoder_linears,
    prune_with,
    run_on_eight_devices,
    xla_flags,
)

# The prototyping example registers its method on import: it gets the mesh checks too.
sys.path.insert(0, str(ROOT / "examples"))
import custom_method  # noqa: E402, F401

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import jprune.prune as jp
    from jprune.config import PruneConfig
    from jprune.converters.hf import load_model
    from jprune.data import calibration_windows, load_tokenizer, read_text, tokenize
    from jprune.mesh_solve import Devices, solve_layer
    from jprune.walk import accumulate_grams
    from jprune.methods import METHODS, LayerProblem, get_method
    from jprune.sharding import make_mesh
    from jprune.solvers import Unstructured

    model_dir, calib, out, examples = sys.argv[1:5]
    options, sharded = json.loads(sys.argv[5]), sys.argv[6].split(",")
    runs, meshes = json.loads(sys.argv[7]), [int(m) for m in sys.argv[8:]]
    assert jax.device_count() == 8, jax.devices()
    sys.path.insert(0, examples)
    import custom_method  # registers the example's method: it gets the mesh checks too
    small = dict(calib=calib, nsamples=8, seqlen=64, evaluate_dense=False)

    def prune(name, label, **settings):
        target = {"sparsity": 0.25} if METHODS[name].structured else {"sparsity": 0.5}
        directory = None if label is None else f"{out}/{name}-{label}"
        config = PruneConfig.of(model_dir, name, **target, out=directory,
                                method_options=options.get(name, {}), **{**small, **settings})
        return jp.prune(config)

    def layer_check(method, problem):
        answers = {
            m: np.asarray(
                solve_layer(get_method(method).layer, problem, Unstructured(0.5), get_method(method).options(), Devices(make_mesh(m)))[0]
            )
            for m in meshes
        }
        base = answers[meshes[0]]
        scale = float(np.abs(base).max())
        return {
            m: [float(np.abs(a - base).max()) / scale, int(((a != 0) != (base != 0)).sum())]
            for m, a in answers.items()
        }

    results = {"layer": {}, "model": {}, "default": {}, "channels": {}}
    # 1. Real layer problems, identical Grams on every mesh: row sharding must not change the
    #    answer beyond float32 round-off. gate has 172 rows (2 devices split them, 8 need them
    #    padded to 176), down 172 inputs; q (64 rows) splits like gate on 2 devices.
    model, _ = load_model(model_dir)
    ids = calibration_windows(tokenize(load_tokenizer(model_dir), read_text(calib)), 8, 64, 0)
    x = model.embed_tokens(jnp.asarray(ids))
    graphdef, state = nnx.split(model.layers[0])
    grams = accumulate_grams(graphdef, ["mlp_in", "down_in"], state, state, x, None, 8)
    for method in sharded:
        results["layer"][method] = {
            role: layer_check(
                method,
                LayerProblem(state[role]["weight"][...], grams[tap]["gram"], None, ids.size, role),
            )
            for role, tap in (("gate", "mlp_in"), ("down", "down_in"))
        }
    # 2. The whole model in the reproducible mode (row_blocks=8) with 32 calibration windows,
    #    split over the devices in batches of 8 or 3: every registered method on each of its
    #    (mesh, batch size) runs, and the sharded methods once in the default mode on one
    #    device for comparison.
    many = dict(small, nsamples=32)
    for name in sorted(METHODS):
        errors = results["model"][name] = {}
        for m, b in runs[name] if name in runs else runs["*"]:
            report = prune(name, f"mesh{m}-batch{b}", row_blocks=8, mesh=m, batch_size=b, **many)
            assert report["machine"]["mesh_devices"] == m
            errors[f"{m}x{b}"] = report["summary"]["relative_error_sum"]
        if name in sharded:
            default = prune(name, None, **many)
            results["default"][name] = default["summary"]["relative_error_sum"]
    # 3. The default mode of the structured methods: data-parallel Grams on 2 devices, and
    #    activations on the host.
    for name in ("fasp", "spap"):
        results["channels"][name] = {
            label: [r["channels"]["after"] for r in prune(name, label, **settings)["layers"]]
            for label, settings in (("default", {}), ("default-mesh2", {"mesh": 2}),
                                    ("offload", {"offload": True}))
        }
    # 4. A per-layer budget couples the rows: the reproducible mode replicates such layers.
    for m in (1, 8):
        prune("fista", f"matrix-mesh{m}", scope="matrix", mesh=m, row_blocks=8)
    # 5. Row blocks the mesh does not divide are refused before anything is written.
    try:
        prune("magnitude", "refused", mesh=8, row_blocks=4)
        raise AssertionError("row_blocks=4 on 8 devices was accepted")
    except jp.JpruneError as err:
        results["refused"] = str(err)
    print(json.dumps(results))
    """
)
SHARDED = ("sparsegpt", "optima", "fista")
# Layer problems: 2 devices split the rows evenly and 8 pad them (a 4-device mesh adds no case of
# its own, only another compilation of every program).
MESHES = ("1", "2", "8")
# The reproducible mode on the whole model (issue 31): (mesh, batch size) runs of 32 windows.
# The sharded methods run every mesh with both batch sizes; every other registered method a
# cover of them (each mesh and each batch size at least once, against one device's batches
# of 8); 8 devices with batches of 8 hold one window each, with batches of 3 they replicate.
EVERY_RUN = [(m, b) for b in (8, 3) for m in (1, 2, 4, 8)]
COVER = [(1, 8), (2, 3), (4, 8), (8, 3)]
RUNS = {"*": COVER, **dict.fromkeys(SHARDED, EVERY_RUN)}
LAYER_WEIGHTS = 172 * 64  # stories260K's gate and down
ALL = sorted(METHODS)
# The engine on a mesh is under test, not the methods' quality: the iterative methods run their
# cheapest settings, the others their defaults.
MESH_OPTIONS = {name: CHEAP_OPTIONS[name] for name in ("spap", "fista", "l0-admm")}


def test_make_mesh_and_padding():
    assert make_mesh(None) is None and make_mesh(1) is None
    padded = pad_rows(np.ones((5, 3), np.float32), None)
    assert padded.shape == (5, 3)


def test_reproducible_grams_are_the_same_bits_for_every_batch_size():
    """The reproducible mode's Grams: window by window, token chunks in order; the batch
    size does not change a bit, and the sum is the Gram (float64 reference, float32 bound)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 200, 12)).astype(np.float32)
    layer = nnx.Linear(12, 12, rngs=nnx.Rngs(0))

    def grams(batch_size, reproducible):
        graphdef, state = nnx.split(_Tapped(layer))
        return accumulate_grams(
            graphdef, ["in"], state, state, jnp.asarray(x), None, batch_size, reproducible
        )["in"]["gram"]

    ordered = {b: np.asarray(grams(b, True)) for b in (1, 3, 7)}
    for b in (3, 7):
        np.testing.assert_array_equal(ordered[b], ordered[1])
    flat = x.reshape(-1, 12).astype(np.float64)
    reference = flat.T @ flat
    # float32 summation of n = 1400 products: |error| <= n eps sum |x_i x_j|
    bound = flat.shape[0] * np.finfo(np.float32).eps * (np.abs(flat).T @ np.abs(flat))
    assert (np.abs(ordered[1] - reference) <= bound).all()
    assert (np.abs(np.asarray(grams(3, False)) - reference) <= bound).all()


class _Tapped(nnx.Module):
    """A one-linear block for ``accumulate_grams``: its input is the tap ``in``."""

    def __init__(self, linear):
        self.linear = linear

    def __call__(self, x):
        return self.linear(x), {"in": x}


@pytest.fixture(scope="module")
def sharded_runs(assets, tmp_path_factory):
    """One subprocess with 8 virtual devices prunes with every method on its meshes."""
    root = tmp_path_factory.mktemp("sharded")
    results = run_on_eight_devices(
        root, SCRIPT, STORIES260K, CALIB_TEXT, root, ROOT / "examples",
        json.dumps(MESH_OPTIONS), ",".join(SHARDED), json.dumps(RUNS), *MESHES,
    )  # fmt: skip
    return root, results


@pytest.mark.parametrize("method", SHARDED)
def test_sharded_pruning_matches_one_device(sharded_runs, method):
    """1-, 2-, 4- and 8-device meshes give one device's weights: up to float32 round-off for
    one layer in the default mode, bit for bit for the whole model in the reproducible mode."""
    root, results = sharded_runs
    # the same layer problem on every mesh: the same mask, and weights equal up to round-off
    # as the iterative solvers amplify it (they stop at a relative tolerance of ~1e-5)
    for role, per_mesh in results["layer"][method].items():
        for mesh, (relative_diff, mask_flips) in per_mesh.items():
            if method == "fista":
                # Issue 31: fista's lambda search turns the row-sharded GEMMs' round-off into a
                # few mask flips on some CPUs (down on 2 devices: 2 of its 11008 weights on a
                # 2-core AMD EPYC, with this code and with bba9b2c's; none on a 2-core Intel
                # Xeon). The default mode promises round-off, not bits; the reproducible mode
                # below is the bit-identical one, and stays exact.
                assert mask_flips <= LAYER_WEIGHTS // 1000, (role, mesh, mask_flips)
            else:
                assert mask_flips == 0 and relative_diff < 1e-3, (
                    role, mesh, relative_diff, mask_flips
                )  # fmt: skip
    # the whole model in the reproducible mode: bit-identical weights on every mesh and for
    # every batch size
    base = _decoder_weights(root / f"{method}-mesh1-batch8")
    for mesh, batch in EVERY_RUN[1:]:
        other = _decoder_weights(root / f"{method}-mesh{mesh}-batch{batch}")
        unequal = {name: int((t != other[name]).sum()) for name, t in base.items()}
        assert sum(unequal.values()) == 0, (mesh, batch, unequal)
        assert results["model"][method][f"{mesh}x{batch}"] == results["model"][method]["1x8"]
    # and the row blocks cost nothing in quality against the default one-device run
    assert results["model"][method]["1x8"] == pytest.approx(results["default"][method], rel=0.02)


def test_reproducible_mode_gives_the_same_bits_with_one_host_device(sharded_runs, tmp_path):
    """Issue 31: the 8-host-device process's checkpoint is also this 1-host-device process's
    (XLA's CPU kernels may split a long contraction by the threads a device has: the
    reproducible mode's Grams add short products in order)."""
    root, _ = sharded_runs
    out = tmp_path / "fista"
    prune_with(
        STORIES260K, "fista", sparsity=0.5, calib=CALIB_TEXT, nsamples=32, seqlen=64,
        evaluate_dense=False, row_blocks=8, batch_size=3, method_options=MESH_OPTIONS["fista"],
        out=out,
    )  # fmt: skip
    here, there = _decoder_weights(out), _decoder_weights(root / "fista-mesh8-batch8")
    unequal = {name: int((t != there[name]).sum()) for name, t in here.items()}
    assert sum(unequal.values()) == 0, unequal


def _decoder_weights(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {n: t for n, t in model.state_dict().items() if "layers" in n}


def test_reproducible_mode_with_a_per_layer_budget(sharded_runs):
    root, _ = sharded_runs
    one = _decoder_weights(root / "fista-matrix-mesh1")
    eight = _decoder_weights(root / "fista-matrix-mesh8")
    assert sum(int((t != eight[name]).sum()) for name, t in one.items()) == 0
    linears = [t for t in one.values() if t.ndim == 2]
    assert all(int((t == 0).sum()) == t.numel() // 2 for t in linears)  # 50% of every layer


def test_row_blocks_the_mesh_does_not_divide_are_refused(sharded_runs):
    root, results = sharded_runs
    assert "does not split over the 8-device mesh" in results["refused"]
    assert not (root / "magnitude-refused").exists()


def test_bfloat16_weights_keep_float32_grams(assets, tmp_path):
    """Precision policy: bf16 weights in and out, Grams and solver arithmetic in float32."""
    out = tmp_path / "bf16"
    report = prune_with(
        STORIES260K,
        "sparsegpt",
        pattern="2:4",
        calib=CALIB_TEXT,
        nsamples=4,
        seqlen=64,
        dtype="bfloat16",
        out=out,
    )
    assert report["config"]["model"]["dtype"] == "bfloat16"
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.bfloat16
    assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2).all()
    # float32 Grams: the relative errors are small and finite, not bf16 noise
    assert all(0 < layer["relative_error"] < 1 for layer in report["layers"])


def test_two_processes_prune_like_one_device(sharded_runs, tmp_path):
    """Multi-host, on one machine: two processes of two CPU devices each join through
    ``jax.distributed`` (gloo collectives), prune on the 4-device mesh they span, and only
    process 0 writes; in the reproducible mode the result is one device's bit for bit, for
    fista, the method most sensitive to round-off. The one-device run to match is
    ``sharded_runs``' (the same settings)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    args = ["--model", str(STORIES260K), "--method", "fista", "--sparsity", "0.5"]
    args += ["--calib", str(CALIB_TEXT), "--nsamples", "32", "--seqlen", "64", "--quiet"]
    args += ["--row-blocks", "8", "--batch-size", "8"]
    for key, value in MESH_OPTIONS["fista"].items():
        args += ["--option", f"{key}={value}"]
    code = "import sys; from jprune.cli import main; sys.exit(main(sys.argv[1:]))"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, "prune", *args, "--distributed", "--mesh", "auto"]
            + ["--out", str(out)],
            env={
                **os.environ,
                "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2"),
                "JAX_PLATFORMS": "cpu",
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JPRUNE_NUM_PROCESSES": "2",
                "JPRUNE_PROCESS_ID": str(index),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in (0, 1)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, stderr) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    assert f"wrote {out}" in outputs[0][0]
    assert "process 1 of 2" in outputs[1][0] and "wrote" not in outputs[1][0]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]  # no staging left behind

    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["processes"] == 2 and report["machine"]["mesh_devices"] == 4
    root, results = sharded_runs
    assert report["summary"]["relative_error_sum"] == results["model"]["fista"]["1x8"]
    spread = dict(decoder_linears(assert_exact_pattern(out, sparsity=0.5)))
    one = dict(decoder_linears(assert_exact_pattern(root / "fista-mesh1-batch8", sparsity=0.5)))
    unequal = {n: int((one[n] != spread[n]).sum()) for n in one}
    assert sum(unequal.values()) == 0, unequal


@pytest.mark.parametrize("name", ALL)
def test_every_method_on_every_mesh_gives_one_device_weights(sharded_runs, name):
    """The registry's contract on a mesh: in the reproducible mode, 2, 4 and 8 devices with
    batches of 8 or 3 windows give one device's checkpoint byte for byte, structured methods
    included."""
    root, _ = sharded_runs
    one = read_tensors(root / f"{name}-mesh1-batch8")
    for mesh, batch in RUNS.get(name, COVER)[1:]:
        other = read_tensors(root / f"{name}-mesh{mesh}-batch{batch}")
        assert one.keys() == other.keys()
        for key in one:
            np.testing.assert_array_equal(one[key], other[key], (mesh, batch, key))


@pytest.mark.parametrize("name", ["fasp", "spap"])
def test_structured_on_a_mesh_and_offloaded_gets_the_single_device_result(sharded_runs, name):
    root, results = sharded_runs
    channels = results["channels"][name]
    assert channels["default-mesh2"] == channels["default"] == channels["offload"]
    single, offload = read_tensors(root / f"{name}-default"), read_tensors(root / f"{name}-offload")
    mesh = read_tensors(root / f"{name}-default-mesh2")
    # Offloading moves activations, not arithmetic: bit for bit. The mesh's data-parallel Gram
    # sums round differently (README, scaling out): the same channels, weights within 1e-4 of
    # each matrix's largest entry (the reproducible mode above is bit-exact).
    for key in single:
        np.testing.assert_array_equal(offload[key], single[key], key)
        scale = max(float(np.abs(single[key]).max()), 1e-30)
        np.testing.assert_allclose(mesh[key], single[key], rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_row_blocks_keep_an_allocated_layers_exact_count(method):
    """A layer-wise allocation's exact count is shared out by row index; solved as row blocks
    (the reproducible mode), every row keeps the zeros the whole layer's rule gives it."""
    from jprune.mesh_solve import Devices, solve_layer
    from jprune.methods import LayerProblem, get_method
    from jprune.solvers import Unstructured

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((30, 16)).astype(np.float32)  # 30 rows: the last block is padded
    x = rng.standard_normal((16, 200)).astype(np.float32)
    problem = LayerProblem(jnp.asarray(weight), jnp.asarray(x @ x.T), None, 200, "w")
    pattern = Unstructured(307 / weight.size, "row", 307)  # 7 rows get 11 zeros, 23 rows 10
    chosen = get_method(method)
    pruned, _ = solve_layer(chosen.layer, problem, pattern, chosen.options(), Devices(None, 4))
    zeros = (np.asarray(pruned) == 0).sum(axis=1)
    np.testing.assert_array_equal(zeros, [11] * 7 + [10] * 23)
