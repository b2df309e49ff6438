"""Solving one layer problem on the run's devices: rows sharded over the mesh, Grams replicated.

A layer method (``(LayerProblem, pattern, options) -> LayerResult``) sees one problem; here it
is placed. Row-separable patterns (a per-row budget: every row is its own problem) shard the
weight's rows over the mesh; a shared budget (per-matrix scope) couples the rows, so the
layer is solved whole. The reproducible mode (``row_blocks > 0``) solves the layer as equal
row blocks, the same program on the same shapes whatever the mesh (``solve_in_row_blocks``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jprune.errors import JpruneError
from jprune.sharding import mesh_size, pad_rows, replicate, shard_leading, to_host
from jprune.solvers import row_separable, rows_pattern


class Devices(NamedTuple):
    """Where layer problems are solved."""

    mesh: Mesh | None = None
    row_blocks: int = 0  # > 0: the reproducible mode's row-block count


def solve_layer(layer_method, problem, pattern, method_options, devices: Devices):
    """Run a layer function with rows sharded over the mesh and the Grams replicated:
    ``(new weight, info)``."""
    mesh = devices.mesh
    if devices.row_blocks and row_separable(pattern):
        return solve_in_row_blocks(layer_method, problem, pattern, method_options, devices)
    rows = problem.weight.shape[0]
    if mesh is not None:
        weight = to_host(problem.weight)
        if row_separable(pattern):
            padded = pad_rows(weight, mesh)
            # An exact count is shared out by row: the padded matrix gets its rows' shares.
            pattern = rows_pattern(pattern, weight.shape, 0, padded.shape[0])
            weight = shard_leading(padded, mesh)
        elif devices.row_blocks:
            # A shared budget couples the rows: the reproducible mode runs the whole layer on
            # every device, the program one device runs, instead of summing across devices.
            weight = replicate(weight, mesh)
        else:
            weight = shard_leading(weight, mesh)  # replicated unless the rows divide
        problem = replicate_grams(problem._replace(weight=weight), mesh)
    result = layer_method(problem, pattern, method_options)
    new_weight = jax.block_until_ready(result.weight)
    if mesh is not None:
        new_weight = jnp.asarray(to_host(new_weight)[:rows])
    return new_weight, result.info


def replicate_grams(problem, mesh: Mesh | None):
    cross = problem.cross_gram
    return problem._replace(
        gram=replicate(problem.gram, mesh),
        cross_gram=None if cross is None else replicate(cross, mesh),
    )


def solve_in_row_blocks(layer_method, problem, pattern, method_options, devices: Devices):
    """Solve the layer as ``devices.row_blocks`` equal blocks of rows (zero rows pad the last).

    XLA picks its GEMM kernel, and with it the rounding, by the operands' shapes: the same rows
    multiplied as part of 64 rows or of 8 can differ in the last bit, and a pruning method's
    discrete choices (masks, best-of rounds) amplify that. Here every device always holds one
    block: a mesh of n devices takes the blocks n at a time, one device one at a time, so each
    device runs the same program on the same shapes whatever n is. The info is one entry per
    call (each call covers n blocks).
    """
    count = mesh_size(devices.mesh)
    if devices.row_blocks % count:
        raise JpruneError(
            f"{devices.row_blocks} row blocks do not split evenly over {count} devices: "
            "choose a row-block count the mesh size divides"
        )
    weight = to_host(problem.weight)
    rows = weight.shape[0]
    extra = -rows % devices.row_blocks
    weight = np.concatenate([weight, np.zeros((extra, weight.shape[1]), weight.dtype)])
    chunk = weight.shape[0] // devices.row_blocks * count
    problem = replicate_grams(problem, devices.mesh)
    pieces, infos = [], []
    for start in range(0, weight.shape[0], chunk):
        part = shard_leading(weight[start : start + chunk], devices.mesh)
        # An exact count is shared out by row: each block of rows gets its rows' shares.
        part_pattern = rows_pattern(pattern, (rows, weight.shape[1]), start, start + chunk)
        result = layer_method(problem._replace(weight=part), part_pattern, method_options)
        pieces.append(to_host(jax.block_until_ready(result.weight)))
        infos.append(result.info)
    return jnp.asarray(np.concatenate(pieces)[:rows]), {"row_blocks": infos}
