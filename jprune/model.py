"""One Flax NNX decoder for every supported family; the differences live in ``ModelSpec``.

Weights keep the torch layout (``(d_out, d_in)`` for linears) so pruning code, the HF export
and the papers' formulas all read the same matrix; ``y = x @ W.T + b``. Parameters are stored
in the checkpoint's dtype and every computation runs in float32.

Canonical parameter names (``converters.hf`` maps them to each family's HF names)::

    embed, pos_embed (OPT), project_in / project_out (OPT-350m style), final_norm, lm_head
    layers.{i}.{attn_norm, q, k, v, o, mlp_norm, gate (gated MLPs only), up, down}
    layers.{i}.{q_norm, k_norm} (Qwen3, Gemma 3), layers.{i}.{attn_out_norm, mlp_out_norm} (Gemma)
    layers.{i}.router, layers.{i}.experts.{e}.{gate, up, down} (mixtures of experts)

A decoder block is also a pure function, ``apply_block(graphdef, state, x)``, returning the
block output and the inputs of its linears ("taps") — what the pruning engine calibrates on.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jprune.converters.spec import LINEAR_INPUTS, ModelSpec, RopeSpec, block_linear_names

COMPUTE_DTYPE = jnp.float32

__all__ = ["LINEAR_INPUTS", "Block", "CausalLM", "apply_block", "block_linear_names"]


def _param(arrays: Mapping[str, np.ndarray], name: str) -> nnx.Param:
    """A parameter from a host array. A read-only one (what ``Checkpoint.read`` returns) is
    placed with ``jax.device_put``, which on the CPU backend takes over its memory when it is
    suitably aligned instead of copying it: a checkpoint's large embedding is then held once,
    not once on the host and once on the device that is the host. ``jnp.asarray`` copies, as
    a writable array, which its owner may still change, needs."""
    array = arrays[name]
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        return nnx.Param(jax.device_put(array))
    return nnx.Param(jnp.asarray(array))


class Linear(nnx.Module):
    def __init__(self, arrays: Mapping[str, np.ndarray], prefix: str, bias: bool):
        self.weight = _param(arrays, f"{prefix}.weight")
        self.bias = _param(arrays, f"{prefix}.bias") if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.weight[...].astype(COMPUTE_DTYPE).T
        if self.bias is not None:
            y = y + self.bias[...].astype(COMPUTE_DTYPE)
        return y


class Embedding(nnx.Module):
    def __init__(self, arrays: Mapping[str, np.ndarray], prefix: str, scale: float | None = None):
        self.weight = _param(arrays, f"{prefix}.weight")
        self.scale = scale

    def __call__(self, ids: jax.Array) -> jax.Array:
        rows = self.weight[...].astype(COMPUTE_DTYPE)[ids]
        if self.scale is None:
            return rows
        # Gemma multiplies by sqrt(hidden) rounded to the weights' dtype.
        return rows * jnp.asarray(self.scale, self.weight[...].dtype).astype(COMPUTE_DTYPE)


class Norm(nnx.Module):
    """RMSNorm (scale ``w``, or ``1 + w`` for Gemma) or LayerNorm (OPT), in float32."""

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        prefix: str,
        kind: str,
        eps: float,
        offset: float = 0.0,
    ):
        self.kind = kind
        self.eps = eps
        self.offset = offset
        self.weight = _param(arrays, f"{prefix}.weight")
        self.bias = _param(arrays, f"{prefix}.bias") if kind == "layer" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "rms":
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
            weight = self.weight[...].astype(COMPUTE_DTYPE)
            return (weight + self.offset if self.offset else weight) * x
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return x * self.weight[...].astype(COMPUTE_DTYPE) + self.bias[...].astype(COMPUTE_DTYPE)


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    return jax.nn.gelu(x, approximate=name == "gelu_tanh")


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _apply_rope(x: jax.Array, rope: RopeSpec, head_dim: int) -> jax.Array:
    """Rotary embedding on (batch, seq, heads, head_dim), positions 0..seq-1; with a partial
    rotary factor only the first ``rotary_dim`` dims of each head rotate."""
    inv_freq = jnp.asarray(rope.inv_freq(head_dim))
    positions = jnp.arange(x.shape[1], dtype=jnp.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    rotary = rope.rotary_dim(head_dim)
    if rotary == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    turned, kept = x[..., :rotary], x[..., rotary:]
    return jnp.concatenate([turned * cos + _rotate_half(turned) * sin, kept], axis=-1)


# Query chunks of at least 64 rows, at most 8 of them (compile time grows with their number).
MIN_ATTENTION_CHUNK = 64
MAX_ATTENTION_CHUNKS = 8


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, spec: ModelSpec, window: int | None = None
) -> jax.Array:
    """Softmax attention on (batch, seq, heads, head_dim); kv heads shared by query groups.

    Queries go in chunks that only see the keys up to their own end (and, with a sliding
    ``window``, from the first key the chunk's first query still sees), which skips most of
    the masked scores: on CPU this halves the work of the (seq x seq) scores and their
    softmax, the dominant cost of a small model's forward. Query ``i`` sees key ``j`` when
    ``j <= i`` and, with a window, ``j > i - window`` (transformers' sliding mask).
    """
    group = spec.num_heads // spec.num_kv_heads
    # HF's repeat_kv: query head h reads kv head h // group.
    k = jnp.repeat(k, group, axis=2).transpose(0, 2, 3, 1)  # (b, h, d, seq)
    v = jnp.repeat(v, group, axis=2).transpose(0, 2, 1, 3)  # (b, h, seq, d)
    q = q.transpose(0, 2, 1, 3)  # (b, h, seq, d)
    scale = spec.attention_scale
    if spec.scale_query_before_dot:
        q = q * scale
    seq = q.shape[2]
    chunk = max(MIN_ATTENTION_CHUNK, -(-seq // MAX_ATTENTION_CHUNKS))
    outputs = []
    for start in range(0, seq, chunk):
        end = min(start + chunk, seq)
        first = 0 if window is None else max(0, start - window + 1)
        scores = q[:, :, start:end] @ k[..., first:end]
        if not spec.scale_query_before_dot:
            scores = scores * scale
        scores = _softcap(scores, spec.attn_softcap)
        queries, keys = jnp.arange(start, end)[:, None], jnp.arange(first, end)[None, :]
        visible = queries >= keys
        if window is not None:
            visible = visible & (keys > queries - window)
        scores = jnp.where(visible, scores, -jnp.inf)
        outputs.append(jax.nn.softmax(scores, axis=-1) @ v[:, :, first:end])
    return jnp.concatenate(outputs, axis=2).transpose(0, 2, 1, 3)


class Expert(nnx.Module):
    def __init__(self, arrays: Mapping[str, np.ndarray], prefix: str, spec: ModelSpec):
        self.gate = Linear(arrays, f"{prefix}.gate", spec.mlp_bias)
        self.up = Linear(arrays, f"{prefix}.up", spec.mlp_bias)
        self.down = Linear(arrays, f"{prefix}.down", spec.mlp_bias)


def routing_weights(logits: jax.Array, spec: ModelSpec) -> tuple[jax.Array, jax.Array]:
    """(tokens, experts) router logits -> each token's weight for each expert (zero where the
    expert is not among its ``experts_per_token`` best) and whether it was chosen."""
    probs = jax.nn.softmax(logits, axis=-1)
    top, chosen = jax.lax.top_k(probs, spec.experts_per_token)
    if spec.normalize_routing:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    picked = jax.nn.one_hot(chosen, spec.num_experts, dtype=probs.dtype)  # (..., k, experts)
    return jnp.einsum("...k,...ke->...e", top, picked), jnp.sum(picked, axis=-2) > 0


def _norm(arrays, name: str, spec: ModelSpec, present: bool = True) -> Norm | None:
    return Norm(arrays, name, spec.norm, spec.norm_eps, spec.norm_offset) if present else None


class Block(nnx.Module):
    """Decoder block ``layer`` (its index picks its sliding window and RoPE)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], layer: int, spec: ModelSpec):
        self.spec = spec
        self.window = spec.window(layer)
        self.rope = spec.layer_rope(layer)
        p = f"layers.{layer}"
        self.attn_norm = _norm(arrays, f"{p}.attn_norm", spec)
        self.q = Linear(arrays, f"{p}.q", spec.qkv_bias)
        self.k = Linear(arrays, f"{p}.k", spec.qkv_bias)
        self.v = Linear(arrays, f"{p}.v", spec.qkv_bias)
        self.q_norm = _norm(arrays, f"{p}.q_norm", spec, spec.qk_norm)
        self.k_norm = _norm(arrays, f"{p}.k_norm", spec, spec.qk_norm)
        self.o = Linear(arrays, f"{p}.o", spec.o_bias)
        self.attn_out_norm = _norm(arrays, f"{p}.attn_out_norm", spec, spec.output_norms)
        self.mlp_norm = _norm(arrays, f"{p}.mlp_norm", spec)
        if spec.num_experts:
            self.router = Linear(arrays, f"{p}.router", False)
            self.experts = nnx.List(
                [Expert(arrays, f"{p}.experts.{e}", spec) for e in range(spec.num_experts)]
            )
        else:
            self.gate = Linear(arrays, f"{p}.gate", spec.mlp_bias) if spec.gated_mlp else None
            self.up = Linear(arrays, f"{p}.up", spec.mlp_bias)
            self.down = Linear(arrays, f"{p}.down", spec.mlp_bias)
        self.mlp_out_norm = _norm(arrays, f"{p}.mlp_out_norm", spec, spec.output_norms)

    def _attention(self, h: jax.Array) -> jax.Array:
        spec = self.spec
        batch, seq, _ = h.shape
        q = self.q(h).reshape(batch, seq, -1, spec.head_dim)
        k = self.k(h).reshape(batch, seq, -1, spec.head_dim)
        # Structured pruning may narrow v (and o's input) below head_dim: v's per-head width
        # comes from its weight, q and k keep head_dim.
        v = self.v(h).reshape(batch, seq, spec.num_kv_heads, -1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = (
                _apply_rope(q, self.rope, spec.head_dim),
                _apply_rope(k, self.rope, spec.head_dim),
            )
        return causal_attention(q, k, v, spec, self.window).reshape(batch, seq, -1)

    def _mlp_hidden(self, h: jax.Array) -> jax.Array:
        if self.gate is not None:
            return _activation(self.spec.activation, self.gate(h)) * self.up(h)
        return _activation(self.spec.activation, self.up(h))

    def _mlp(self, mlp_in: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The MLP's output and the taps of its linears."""
        if not self.spec.num_experts:
            down_in = self._mlp_hidden(mlp_in)
            return self.down(down_in), {"down_in": down_in}
        # Every expert runs on every token with the others' rows zeroed (fixed shapes under
        # jit; it costs num_experts dense MLPs): its taps hold exactly the routed tokens, so
        # their Grams are the routed tokens' Grams.
        weights, chosen = routing_weights(self.router(mlp_in), self.spec)
        output = jnp.zeros_like(mlp_in)
        taps = {}
        for e, expert in enumerate(self.experts):
            routed = chosen[..., e, None]
            x = jnp.where(routed, mlp_in, 0.0)
            hidden = _activation(self.spec.activation, expert.gate(x)) * expert.up(x)
            hidden = jnp.where(routed, hidden, 0.0)
            output = output + expert.down(hidden) * weights[..., e, None]
            taps |= {f"experts.{e}.mlp_in": x, f"experts.{e}.down_in": hidden}
        return output, taps

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Block output and the inputs of its linears (see ``LINEAR_INPUTS``)."""
        return self.finish(x, self.attend(x))

    def attend(self, x: jax.Array) -> jax.Array:
        """The attention output of block input ``x``: the input of ``o`` (tap ``o_in``)."""
        return self._attention(self.attn_norm(x) if self.spec.norm_before else x)

    def finish(self, x: jax.Array, o_in: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``__call__`` given the attention output ``o_in = attend(x)``.

        Attention is most of a block's forward cost and depends only on ``q``, ``k``, ``v``:
        the engine computes it once per block and reruns only this part as ``o`` and the MLP
        change.
        """
        attn_in = self.attn_norm(x) if self.spec.norm_before else x
        x, taps = self.finish_mlp(self.after_attention(x, o_in))
        return x, {"attn_in": attn_in, "o_in": o_in, **taps}

    def after_attention(self, x: jax.Array, o_in: jax.Array) -> jax.Array:
        """The residual stream entering the MLP part: block input ``x`` plus the attention
        branch (``o`` of the attention output ``o_in``), normed here when norms come after."""
        x = x + _maybe(self.attn_out_norm, self.o(o_in))
        return x if self.spec.norm_before else self.attn_norm(x)

    def finish_mlp(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Block output and the MLP's taps from ``x = after_attention(...)``: once ``o`` is
        final too, the engine keeps that residual and reruns only the MLP."""
        pre_norm = self.spec.norm_before
        mlp_in = self.mlp_norm(x) if pre_norm else x
        mlp_out, mlp_taps = self._mlp(mlp_in)
        x = x + _maybe(self.mlp_out_norm, mlp_out)
        if not pre_norm:
            x = self.mlp_norm(x)
        return x, {"mlp_in": mlp_in, **mlp_taps}


def _maybe(norm: Norm | None, x: jax.Array) -> jax.Array:
    return x if norm is None else norm(x)


class CausalLM(nnx.Module):
    """A decoder-only LM built from canonical-named arrays (see module docstring).

    ``with_blocks=False`` builds only what surrounds the decoder blocks (embeddings, final norm,
    head): the shell a block-streaming run keeps in memory while blocks come and go.
    """

    def __init__(
        self, spec: ModelSpec, arrays: Mapping[str, np.ndarray], *, with_blocks: bool = True
    ):
        self.spec = spec
        self.embed = Embedding(arrays, "embed", spec.hidden_size**0.5 if spec.embed_scale else None)
        self.pos_embed = Embedding(arrays, "pos_embed") if spec.rope is None else None
        self.project_in = Linear(arrays, "project_in", False) if spec.has_projections else None
        count = spec.num_layers if with_blocks else 0
        self.layers = nnx.List([Block(arrays, i, spec) for i in range(count)])
        self.final_norm = _norm(arrays, "final_norm", spec, spec.final_norm)
        self.project_out = Linear(arrays, "project_out", False) if spec.has_projections else None
        self.lm_head = None if spec.tie_embeddings else Linear(arrays, "lm_head", False)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """Token ids (batch, seq) -> input of block 0."""
        x = self.embed(ids)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.pos_embed is not None:
            positions = jnp.arange(ids.shape[1]) + self.spec.position_offset
            x = x + self.pos_embed(positions)[None]
        return x

    def head(self, x: jax.Array) -> jax.Array:
        """Output of the last block -> logits."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        if self.lm_head is None:
            logits = x @ self.embed.weight[...].astype(COMPUTE_DTYPE).T
        else:
            logits = self.lm_head(x)
        return _softcap(logits, self.spec.final_softcap)

    def last_hidden(self, ids: jax.Array) -> jax.Array:
        """Token ids (batch, seq) -> output of the last block (the input of ``head``)."""
        x = self.embed_tokens(ids)
        for block in self.layers:
            x, _ = block(x)
        return x

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.head(self.last_hidden(ids))


# ---- pure-function views, used under jit by eval and the pruning engine ----


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(ids)


def logits(model: CausalLM, ids: jax.Array) -> jax.Array:
    """Jit-compiled forward: token ids (batch, seq) -> float32 logits (batch, seq, vocab)."""
    graphdef, state = nnx.split(model)
    return _logits(graphdef, state, ids)


@functools.partial(jax.jit, static_argnums=0)
def apply_block(
    graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pure block forward: (block structure, block weights, input) -> (output, linear inputs)."""
    return nnx.merge(graphdef, state)(x)


@functools.partial(jax.jit, static_argnums=0)
def embed_apply(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
    """Pure embedding: (model structure, weights, token ids) -> the first block's inputs."""
    return nnx.merge(graphdef, state).embed_tokens(ids)


@functools.partial(jax.jit, static_argnums=0)
def _head(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).head(x)


def embed_tokens(model: CausalLM, ids: jax.Array) -> jax.Array:
    return embed_apply(*nnx.split(model), ids)


def head_logits(model: CausalLM, x: jax.Array) -> jax.Array:
    return _head(*nnx.split(model), x)


def flat_arrays(tree: nnx.Module | nnx.State, prefix: str = "") -> dict[str, jax.Array]:
    """Dotted name -> parameter array of a module (its ``nnx.Param``s) or of a split state,
    each name after ``prefix`` (``flat_arrays(block, "layers.3.")`` gives ``layers.3.q.weight``)."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)
    flat = nnx.to_flat_state(state)
    return {prefix + ".".join(str(k) for k in path): var[...] for path, var in flat}


def named_arrays(model: CausalLM) -> dict[str, jax.Array]:
    """Canonical dotted name -> parameter array (e.g. ``layers.0.q.weight``)."""
    return flat_arrays(model)


def parameter_count(model: CausalLM) -> int:
    return sum(int(np.prod(a.shape)) for a in named_arrays(model).values())
