"""Differentiate a pruning objective through the lasso solver's implicit VJP.

One real layer (the MLP ``up`` projection of stories260K's first block) is pruned by the lasso
that FISTAPruner solves, with the calibration tokens weighted by ``a`` (``a = n softmax(theta)``,
so the total weight stays ``n``):

    W*(a) = argmin_W  1/2 tr(W H(a) W^T) - tr(W0 H(a) W^T) + sum_i lam_i ||w_i||_1,
    H(a) = X diag(a) X^T            (X: the layer's inputs on the calibration tokens)

and the objective is the held-out relative error ``||(W*(a) - W0) Y||^2 / ||W0 Y||^2`` on other
tokens ``Y``. ``jprune.solvers.fista`` is differentiable in ``H``, ``C`` and ``lam`` by implicit
differentiation (one adjoint solve on the support, nothing unrolled), so ``jax.grad`` of the
objective in ``theta`` goes through the solver. The script checks that gradient against central
finite differences (float64), then takes a few gradient steps on ``theta`` and prints the
held-out error and the share of nonzero weights as they go (``lam`` stays fixed, chosen so the
lasso keeps about half the weights at uniform weighting).

Run from the repository root: ``.venv/bin/python examples/differentiable_solver.py``.
"""

import jax

jax.config.update("jax_enable_x64", True)  # the finite-difference check needs float64

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jprune.converters.hf import Checkpoint  # noqa: E402
from jprune.data import calibration_windows, load_tokenizer, read_text, tokenize  # noqa: E402
from jprune.model import Block, CausalLM  # noqa: E402
from jprune.solvers import fista  # noqa: E402

MODEL = "../shared/assets/models/stories260K"
TEXT = "../shared/assets/text/tinystories_calib.txt"


def layer_inputs(windows: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """The ``up`` projection's weight and its inputs (d_in, tokens) in block 0."""
    checkpoint = Checkpoint(MODEL)
    shell = CausalLM(checkpoint.spec, checkpoint.outer(), with_blocks=False)
    block = Block(checkpoint.block(0), "layers.0", checkpoint.spec)
    _, taps = block(shell.embed_tokens(jnp.asarray(windows)))
    x = taps["mlp_in"].reshape(-1, taps["mlp_in"].shape[-1])
    return jnp.asarray(block.up.weight[...], jnp.float64), jnp.asarray(x.T, jnp.float64)


def pruned(theta, lam, W0, X):
    a = X.shape[1] * jax.nn.softmax(theta)
    H = (X * a) @ X.T
    W, _ = fista(H, W0 @ H, lam, maxiter=3000, tol=1e-10)
    return W


def held_out_error(theta, lam, W0, X, Y):
    delta = (pruned(theta, lam, W0, X) - W0) @ Y
    return jnp.sum(delta**2) / jnp.sum((W0 @ Y) ** 2)


def main() -> None:
    ids = tokenize(load_tokenizer(MODEL), read_text(TEXT))
    windows = calibration_windows(ids, 8, 128, seed=0)
    W0, tokens = layer_inputs(windows)
    X, Y = tokens[:, :512], tokens[:, 512:]  # calibration tokens, held-out tokens
    theta = jnp.zeros(X.shape[1])
    # lam per row: a fixed share of the row's largest |c_ij| keeps about half the weights
    H = X @ X.T
    lam = 0.06 * jnp.max(jnp.abs(W0 @ H), axis=1)
    loss = jax.jit(held_out_error)
    grad = jax.jit(jax.grad(held_out_error))

    g = grad(theta, lam, W0, X, Y)
    rng = np.random.default_rng(0)
    for trial in range(3):
        v = jnp.asarray(rng.standard_normal(theta.shape))
        eps = 1e-4
        fd = (loss(theta + eps * v, lam, W0, X, Y) - loss(theta - eps * v, lam, W0, X, Y)) / (
            2 * eps
        )
        print(
            f"direction {trial}: implicit VJP {float(g @ v):+.6e}, "
            f"finite difference {float(fd):+.6e}, relative gap {abs(float(g @ v - fd)) / abs(float(fd)):.1e}"
        )

    step = 1.0 / float(jnp.max(jnp.abs(g)) * X.shape[1])
    for it in range(6):
        error = float(loss(theta, lam, W0, X, Y))
        density = float(jnp.mean(pruned(theta, lam, W0, X) != 0))
        print(f"step {it}: held-out relative error {error:.5f}, nonzero share {density:.3f}")
        theta = theta - step * grad(theta, lam, W0, X, Y) * X.shape[1]


if __name__ == "__main__":
    main()
