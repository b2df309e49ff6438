"""Hugging Face checkpoint directories <-> jprune ``CausalLM``.

Reads ``config.json`` with ``model.safetensors``, sharded safetensors (an index file), or
``pytorch_model.bin``; writes the ``save_pretrained`` layout back, from a loaded model
(``save_model``) or a block at a time from a checkpoint (``convert``, the same bytes). Tensor
names go through one explicit table per family; a tensor the table does not know is refused by
name, a missing one too. Saving writes into a temporary sibling directory and renames it at
the end, so a failure never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jprune.converters import safetensors_file
from jprune.converters.safetensors_file import SafetensorsFile, nbytes
from jprune.converters.spec import (
    ModelSpec,
    UnsupportedModelError,
    layer_widths,
    spec_from_hf_config,
)
from jprune.errors import JpruneError, writing


class CheckpointError(JpruneError):
    """The checkpoint directory is missing, incomplete or unreadable."""


DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# Canonical name (see jprune.model) -> HF name, per family. "{i}" is the layer index.
_LLAMA_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{
        f"layers.{{i}}.{role}.{kind}": f"model.layers.{{i}}.self_attn.{role}_proj.{kind}"
        for role in ("q", "k", "v", "o")
        for kind in ("weight", "bias")
    },
    **{
        f"layers.{{i}}.{role}.{kind}": f"model.layers.{{i}}.mlp.{role}_proj.{kind}"
        for role in ("gate", "up", "down")
        for kind in ("weight", "bias")
    },
    "layers.{i}.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
# Gemma 2/3 name their four block norms by position: post_attention_layernorm is the norm of
# the attention output, pre_feedforward_layernorm the MLP's input norm.
_GEMMA_NAMES = {
    **_LLAMA_NAMES,
    "layers.{i}.attn_out_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "layers.{i}.mlp_out_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
# Phi-3 fuses q, k, v into one matrix and gate, up into another (rows stacked in this order);
# they are split on reading, so each logical projection is pruned on its own, and stacked back
# on writing.
_PHI3_NAMES = {
    **_LLAMA_NAMES,
    **{f"layers.{{i}}.{r}.weight": "model.layers.{i}.self_attn.qkv_proj.weight" for r in "qkv"},
    **{
        f"layers.{{i}}.{r}.weight": "model.layers.{i}.mlp.gate_up_proj.weight"
        for r in ("gate", "up")
    },
}
_OPT_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.out_proj",
    "up": "fc1",
    "down": "fc2",
}
_OPT_NORMS = {"attn_norm": "self_attn_layer_norm", "mlp_norm": "final_layer_norm"}
_OPT_NAMES = {
    "embed.weight": "model.decoder.embed_tokens.weight",
    "pos_embed.weight": "model.decoder.embed_positions.weight",
    "project_in.weight": "model.decoder.project_in.weight",
    "project_out.weight": "model.decoder.project_out.weight",
    "final_norm.weight": "model.decoder.final_layer_norm.weight",
    "final_norm.bias": "model.decoder.final_layer_norm.bias",
    "lm_head.weight": "lm_head.weight",
    **{
        f"layers.{{i}}.{ours}.{kind}": f"model.decoder.layers.{{i}}.{theirs}.{kind}"
        for ours, theirs in {**_OPT_LINEARS, **_OPT_NORMS}.items()
        for kind in ("weight", "bias")
    },
}
# Mixtures of experts. The hub stores one tensor per expert (Mixtral under block_sparse_moe,
# with w1 = gate, w3 = up, w2 = down); transformers 5 stacks the experts: gate_up_proj
# (experts, 2 x width, hidden) with gate rows first, and down_proj (experts, hidden, width).
_QWEN3_MOE_NAMES = {
    **_LLAMA_NAMES,
    "layers.{i}.router.weight": "model.layers.{i}.mlp.gate.weight",
    **{
        f"layers.{{i}}.experts.{{e}}.{r}.weight": f"model.layers.{{i}}.mlp.experts.{{e}}.{r}_proj.weight"
        for r in ("gate", "up", "down")
    },
}
_MIXTRAL_NAMES = {
    **_LLAMA_NAMES,
    "layers.{i}.router.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    **{
        f"layers.{{i}}.experts.{{e}}.{r}.weight": f"model.layers.{{i}}.block_sparse_moe.experts.{{e}}.{w}.weight"
        for r, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
    },
}
_STACKED_EXPERT_NAMES = {
    "layers.{i}.router.weight": "model.layers.{i}.mlp.gate.weight",
    "layers.{i}.experts.{e}.gate.weight": "model.layers.{i}.mlp.experts.gate_up_proj",
    "layers.{i}.experts.{e}.up.weight": "model.layers.{i}.mlp.experts.gate_up_proj",
    "layers.{i}.experts.{e}.down.weight": "model.layers.{i}.mlp.experts.down_proj",
}
_NAME_TABLES = {
    "qwen3_moe": _QWEN3_MOE_NAMES,
    "mixtral": _MIXTRAL_NAMES,
    "llama": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,
    "qwen3": _LLAMA_NAMES,
    "mistral": _LLAMA_NAMES,
    "gemma2": _GEMMA_NAMES,
    "gemma3_text": _GEMMA_NAMES,
    "phi3": _PHI3_NAMES,
    "opt": _OPT_NAMES,
}
# Buffers some older checkpoints carry that the forward recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name_map(spec: ModelSpec) -> dict[str, str]:
    """Canonical name -> HF name for every tensor this spec's model holds."""
    table = _NAME_TABLES[spec.family]
    if spec.num_experts and spec.expert_layout == "fused":
        table = {**table, **_STACKED_EXPERT_NAMES}
    names = ["embed.weight"]
    if spec.rope is None:
        names.append("pos_embed.weight")
    if spec.has_projections:
        names += ["project_in.weight", "project_out.weight"]
    if spec.final_norm:
        names += ["final_norm.weight"] + (["final_norm.bias"] if spec.norm == "layer" else [])
    if not spec.tie_embeddings:
        names.append("lm_head.weight")
    per_layer = ["attn_norm", "mlp_norm"]
    per_layer += ["q_norm", "k_norm"] if spec.qk_norm else []
    per_layer += ["attn_out_norm", "mlp_out_norm"] if spec.output_norms else []
    norm_kinds = ("weight", "bias") if spec.norm == "layer" else ("weight",)
    layer_names = [f"layers.{{i}}.{n}.{k}" for n in per_layer for k in norm_kinds]
    biases = {"q": spec.qkv_bias, "k": spec.qkv_bias, "v": spec.qkv_bias, "o": spec.o_bias}
    mlp_roles = ("gate", "up", "down") if spec.gated_mlp else ("up", "down")
    if spec.num_experts:
        layer_names.append("layers.{i}.router.weight")
        mlp_roles = tuple(f"experts.{e}.{r}" for e in range(spec.num_experts) for r in mlp_roles)
    biases |= dict.fromkeys(mlp_roles, spec.mlp_bias)
    for role, has_bias in biases.items():
        layer_names.append(f"layers.{{i}}.{role}.weight")
        if has_bias:
            layer_names.append(f"layers.{{i}}.{role}.bias")
    for i in range(spec.num_layers):
        names += [n.replace("{i}", str(i)) for n in layer_names]
    return {n: _hf_for(table, n) for n in names}


def _hf_for(table: Mapping[str, str], canonical: str) -> str:
    parts = canonical.split(".")
    if parts[0] != "layers":
        return table[canonical]
    if parts[2] == "experts":
        template = ".".join(["layers", "{i}", "experts", "{e}", *parts[4:]])
        return table[template].replace("{i}", parts[1]).replace("{e}", parts[3])
    template = ".".join(["layers", "{i}", *parts[2:]])
    return table[template].replace("{i}", parts[1])


def _expert_of(canonical: str) -> int | None:
    parts = canonical.split(".")
    return int(parts[3]) if len(parts) > 4 and parts[2] == "experts" else None


def _by_expert(names: list[str]) -> dict[int | None, list[str]]:
    groups: dict[int | None, list[str]] = {}
    for name in names:
        groups.setdefault(_expert_of(name), []).append(name)
    return groups


def fused_groups(name_map: Mapping[str, str]) -> dict[str, list[str]]:
    """HF name -> the canonical names stacked in it (row blocks in this order, experts along a
    leading axis), for the HF tensors that hold several of jprune's (Phi-3's ``qkv_proj`` and
    ``gate_up_proj``, transformers 5's stacked experts)."""
    groups: dict[str, list[str]] = {}
    for ours, theirs in name_map.items():
        groups.setdefault(theirs, []).append(ours)
    return {theirs: names for theirs, names in groups.items() if len(names) > 1}


def _row_splits(spec: ModelSpec, names: list[str], rows: int) -> list[int]:
    """Row counts of the canonical pieces of a fused tensor with ``rows`` rows."""
    roles = [n.split(".")[-2] for n in names]
    if roles == ["q", "k", "v"]:
        q, k = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        splits = [q, k, rows - q - k]
    elif roles == ["gate", "up"]:
        splits = [rows // 2, rows - rows // 2]
    elif len(roles) == 1:
        splits = [rows]
    else:  # pragma: no cover - the name tables fuse only these two groups
        raise UnsupportedModelError(f"no row split is known for the fused {roles}")
    if min(splits) <= 0 or (roles == ["gate", "up"] and rows % 2):
        raise CheckpointError(f"fused tensor of {names[0]} has {rows} rows: cannot split {roles}")
    return splits


def fused_slices(
    spec: ModelSpec, name_map: Mapping[str, str], stored_shapes: Mapping[str, Any]
) -> dict[str, tuple]:
    """Canonical name -> the index of its piece in its fused HF tensor: ``(rows,)``, or
    ``(expert, rows)`` in a stacked-experts tensor."""
    slices = {}
    for theirs, names in fused_groups(name_map).items():
        shape = stored_shapes[theirs].shape
        groups = _by_expert(names)
        stacked = None not in groups
        if stacked and (len(shape) != 3 or shape[0] != len(groups)):
            raise CheckpointError(
                f"{theirs!r} has shape {tuple(shape)}: expected {len(groups)} stacked experts"
            )
        for expert, members in groups.items():
            start = 0
            splits = _row_splits(spec, members, shape[1] if stacked else shape[0])
            for name, rows in zip(members, splits, strict=True):
                piece = slice(start, start + rows)
                slices[name] = (expert, piece) if stacked else (piece,)
                start += rows
    return slices


def hf_tensors(name_map: Mapping[str, str], arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Canonical-named arrays -> HF-named tensors, fused pieces stacked back in order."""
    groups = fused_groups(name_map)
    tensors = {}
    for ours, array in arrays.items():
        theirs = name_map[ours]
        if theirs not in groups:
            tensors[theirs] = np.ascontiguousarray(array)
        elif theirs not in tensors:
            parts = {
                expert: np.concatenate([np.asarray(arrays[n]) for n in members])
                for expert, members in _by_expert(groups[theirs]).items()
            }
            tensors[theirs] = parts[None] if None in parts else np.stack(list(parts.values()))
    return tensors


def _expert_layout(spec: ModelSpec, stored) -> ModelSpec:
    """The spec with the expert layout the stored tensor names use."""
    if not spec.num_experts:
        return spec
    stacked = hf_name_map(dataclasses.replace(spec, expert_layout="fused"))
    if stacked["layers.0.experts.0.gate.weight"] in stored:
        return dataclasses.replace(spec, expert_layout="fused")
    return dataclasses.replace(spec, expert_layout="per_expert")


# ---------------------------------------------------------------- reading


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"model path {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"model path {str(directory)!r} is not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{str(config_path)!r} is missing: not a Hugging Face model directory"
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(config_path)!r} is not valid JSON: {err}") from None


def _read_safetensors(file: Path, names=None) -> dict[str, np.ndarray]:
    try:
        return safetensors_file.read_tensors(file, names)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {str(file)!r} (truncated or corrupt safetensors?): {err}"
        ) from None


def _safetensors_shapes(file: Path) -> dict[str, jax.ShapeDtypeStruct]:
    """Name -> shape and dtype of every tensor of a safetensors file, from its header only."""
    try:
        with safe_open(str(file), framework="np") as f:
            out = {}
            for name in f.keys():
                view = f.get_slice(name)
                dtype = safetensors_file.DTYPES_BY_CODE.get(view.get_dtype(), np.dtype(np.float32))
                out[name] = jax.ShapeDtypeStruct(tuple(view.get_shape()), dtype)
            return out
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {str(file)!r} (truncated or corrupt safetensors?): {err}"
        ) from None


def _read_torch_bin(file: Path) -> dict[str, np.ndarray]:
    import torch

    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad pickle/zip
        raise CheckpointError(f"cannot read {str(file)!r}: {err}") from None
    arrays = {}
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            # numpy has no bfloat16: move the raw bits so the values stay bit-exact.
            arrays[name] = tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            arrays[name] = tensor.numpy()
    return arrays


def _weight_files(directory: Path) -> dict[str, list[str]] | None:
    """Safetensors file -> the HF names it holds (from headers / the index), or ``None`` for
    a ``pytorch_model.bin`` checkpoint."""
    if (directory / SAFE_WEIGHTS).is_file():
        return {SAFE_WEIGHTS: list(_safetensors_shapes(directory / SAFE_WEIGHTS))}
    if (directory / SAFE_INDEX).is_file():
        try:
            weight_map = json.loads((directory / SAFE_INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{SAFE_INDEX} in {str(directory)!r} is unreadable: {err}"
            ) from None
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(shard, []).append(name)
        for shard in sorted(files):
            if not (directory / shard).is_file():
                raise CheckpointError(f"shard {shard!r} named in {SAFE_INDEX} is missing")
        return files
    if (directory / BIN_WEIGHTS).is_file():
        return None
    raise CheckpointError(
        f"no weights in {str(directory)!r}: expected {SAFE_WEIGHTS}, {SAFE_INDEX} or {BIN_WEIGHTS}"
    )


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint directory, by HF name, in their stored dtype."""
    directory = Path(path)
    files = _weight_files(directory)
    if files is None:
        return _read_torch_bin(directory / BIN_WEIGHTS)
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(files):
        tensors.update(_read_safetensors(directory / shard))
    return tensors


def _check_names(spec: ModelSpec, available) -> dict[str, str]:
    """The spec's canonical -> HF name table, after refusing unknown and missing tensors."""
    name_map = hf_name_map(spec)
    expected = set(name_map.values())
    tied_head = "lm_head.weight" if spec.tie_embeddings else None
    unknown = sorted(
        n
        for n in available
        if n not in expected and n != tied_head and not n.endswith(_IGNORED_SUFFIXES)
    )
    if unknown:
        raise UnsupportedModelError(
            f"checkpoint tensor {unknown[0]!r} is not handled by the {spec.family} converter"
        )
    missing = sorted(expected - set(available))
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}")
    return name_map


class Checkpoint:
    """An HF checkpoint directory, opened lazily: the config and the tensor headers are read
    at once (so unknown, missing or mis-sized tensors are refused before any work), tensors
    only when asked for, a block at a time. Safetensors are memory-mapped and read per
    tensor; a ``pytorch_model.bin`` is loaded once into host memory (its format has no index).
    """

    def __init__(self, path: str | os.PathLike, dtype: str | None = None):
        if dtype is not None and dtype not in DTYPES:
            raise JpruneError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        self.path = Path(path)
        self.config = read_config(path)
        self.spec = spec_from_hf_config(self.config)
        self.dtype = None if dtype is None else DTYPES[dtype]
        files = _weight_files(self.path)
        if files is None:
            self._loaded = _read_torch_bin(self.path / BIN_WEIGHTS)
            self._file_of: dict[str, str] = {}
            stored = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self._loaded.items()}
        else:
            self._loaded = {}
            self._file_of = {name: file for file, names in files.items() for name in names}
            stored = {}
            for file in sorted(files):
                stored |= _safetensors_shapes(self.path / file)
        self.stored = stored  # HF name -> shape and dtype as stored
        self.spec = _expert_layout(self.spec, stored)
        self.name_map = _check_names(self.spec, stored)
        self._slices = fused_slices(self.spec, self.name_map, stored)
        self.shapes = {}
        for ours, theirs in self.name_map.items():
            shape = stored[theirs].shape
            if ours in self._slices:
                shape = jax.eval_shape(lambda a, i=self._slices[ours]: a[i], stored[theirs]).shape
            self.shapes[ours] = jax.ShapeDtypeStruct(shape, self.dtype or stored[theirs].dtype)
        _check_widths(self.config, self.spec, self.shapes)

    def read(self, names) -> dict[str, np.ndarray]:
        """Canonical name -> array (cast to the requested dtype) for ``names``."""
        names = list(names)
        wanted = {self.name_map[ours] for ours in names}
        by_file: dict[str, list[str]] = {}
        tensors: dict[str, np.ndarray] = {}
        for theirs in sorted(wanted):
            if theirs in self._loaded:
                tensors[theirs] = self._loaded[theirs]
            else:
                by_file.setdefault(self._file_of[theirs], []).append(theirs)
        for file, hf_names in by_file.items():
            read = _read_safetensors(self.path / file, hf_names)
            _require_finite(read, self.path / file)
            tensors |= read
        out: dict[str, np.ndarray] = {}
        for ours in names:
            array = tensors[self.name_map[ours]]
            if ours in self._slices:
                array = array[self._slices[ours]]
            out[ours] = array
        if self.dtype is not None:
            out = {k: v.astype(self.dtype) for k, v in out.items()}
        return {k: out[k] for k in names}

    def block_names(self, index: int) -> list[str]:
        prefix = f"layers.{index}."
        return [n for n in self.name_map if n.startswith(prefix)]

    def outer_names(self) -> list[str]:
        """Everything outside the decoder blocks: embeddings, final norm, head."""
        return [n for n in self.name_map if not n.startswith("layers.")]

    def block(self, index: int) -> dict[str, np.ndarray]:
        return self.read(self.block_names(index))

    def outer(self) -> dict[str, np.ndarray]:
        return self.read(self.outer_names())

    @property
    def parameter_count(self) -> int:
        return sum(int(np.prod(s.shape)) for s in self.shapes.values())


def _require_finite(tensors: Mapping[str, np.ndarray], file: Path) -> None:
    """Refuse a tensor holding NaN or Inf, by name, when it is read: every number jprune
    computes from it (Grams, solves, perplexities) would be NaN, far from where it came in.
    No real checkpoint has them on purpose; one that does is damaged."""
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
            continue
        finite = np.isfinite(array)  # float16 and ml_dtypes' bfloat16 too: no float32 copy
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise CheckpointError(
                f"tensor {name!r} in {str(file)!r} holds {bad} NaN or infinite value"
                f"{'s' if bad > 1 else ''} of {array.size}: the checkpoint is damaged"
            )


def load_model(path: str | os.PathLike, dtype: str | None = None):
    """Load an HF directory into a ``jprune.model.CausalLM``, every block in memory.

    Returns ``(model, hf_config)``. ``dtype`` (``float32``/``float16``/``bfloat16``) casts the
    stored weights; ``None`` keeps them as stored. ``Checkpoint`` reads a block at a time.
    """
    from jprune.model import CausalLM

    checkpoint = Checkpoint(path, dtype)
    return CausalLM(checkpoint.spec, checkpoint.read(checkpoint.name_map)), checkpoint.config


def _check_widths(config: Mapping[str, Any], spec: ModelSpec, arrays) -> None:
    """The MLP and value widths of the tensors are the ones the config declares, per layer and
    for every expert (a checkpoint whose experts differ would otherwise load and run)."""
    widths = layer_widths(config, spec)
    units = [f"experts.{e}." for e in range(spec.num_experts)] if spec.num_experts else [""]
    for i in range(spec.num_layers):
        found = []
        for unit in units:
            for role, axis in (("gate", 0), ("up", 0), ("down", 1)):
                weight = arrays.get(f"layers.{i}.{unit}{role}.weight")
                if weight is not None:
                    found.append(("intermediate", f"{unit}{role}", weight.shape[axis]))
        v_rows = arrays[f"layers.{i}.v.weight"].shape[0]
        found.append(("v_head", "v", v_rows / spec.num_kv_heads))
        for key, tensor, width in found:
            if width != widths[key][i]:
                raise CheckpointError(
                    f"layer {i}: {tensor} has {key} width {width:g}, "
                    f"the config says {widths[key][i]}"
                )


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; move it to ``out`` only on success."""
    out = Path(out)
    if out.exists() and not force:
        raise JpruneError(f"output {str(out)!r} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    staging.rename(out)


SAFE_METADATA = {"format": "pt"}


def shard_files(sizes: Mapping[str, int], max_bytes: int) -> dict[str, list[str]]:
    """File name -> the tensors it holds, in the ``save_pretrained`` layout: the tensors sorted
    by name, one ``model.safetensors``, or consecutive shards
    ``model-0000i-of-0000n.safetensors`` of at most ``max_bytes`` (a larger tensor alone).
    ``sizes``: tensor name -> bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(sizes):
        if shards[-1] and size + sizes[name] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += sizes[name]
    if len(shards) == 1:
        return {SAFE_WEIGHTS: shards[0]}
    count = len(shards)
    return {f"model-{i:05d}-of-{count:05d}.safetensors": s for i, s in enumerate(shards, start=1)}


def write_index(directory: Path, files: Mapping[str, list[str]], sizes: Mapping[str, int]) -> None:
    """The index of a sharded checkpoint: every tensor's file and the tensors' total bytes."""
    weight_map = {name: file for file, names in files.items() for name in names}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_tensors(directory: Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> None:
    """Write safetensors in the ``save_pretrained`` layout, sharded with an index when large."""
    tensors = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    sizes = {name: array.nbytes for name, array in tensors.items()}
    files = shard_files(sizes, max_shard_bytes)
    for file, names in files.items():
        save_file({n: tensors[n] for n in names}, str(directory / file), metadata=SAFE_METADATA)
    if len(files) > 1:
        write_index(directory, files, sizes)


def dtype_name(arrays: Mapping[str, np.ndarray]) -> str:
    names = {v: k for k, v in DTYPES.items()}
    return names.get(next(iter(arrays.values())).dtype, "float32")


def export_config(
    hf_config: Mapping[str, Any], dtype_name: str, config_updates: Mapping[str, Any] | None
) -> dict[str, Any]:
    """config.json of an exported checkpoint: the source's, its dtype and the updates."""
    config = dict(hf_config)
    config["dtype"] = dtype_name
    config.pop("torch_dtype", None)
    return config | dict(config_updates or {})


def write_metadata(
    directory: Path,
    config: Mapping[str, Any],
    source: str | os.PathLike | None,
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """config.json, generation config, tokenizer files, remote code and ``extra_files``."""
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    src = Path(source) if source is not None else None
    generation = src / "generation_config.json" if src else None
    if generation is not None and generation.is_file():
        shutil.copy2(generation, directory / "generation_config.json")
    else:
        gen = {
            k: config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config.get(k) is not None
        }
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for name in TOKENIZER_FILES if src else ():
        if (src / name).is_file():
            shutil.copy2(src / name, directory / name)
    # Remote modeling code the config points to travels with the weights.
    for ref in (config.get("auto_map") or {}).values() if src else ():
        module = f"{ref.split('.')[0]}.py"
        if (src / module).is_file():
            shutil.copy2(src / module, directory / module)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)


def save_model(
    model,
    hf_config: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config_updates: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` as an HF checkpoint directory that transformers reloads.

    ``source`` is the directory it came from: its tokenizer and generation config are copied.
    ``config_updates`` are merged into config.json (e.g. new widths after structured pruning);
    ``extra_files`` maps file names to text written beside it (e.g. remote modeling code).
    """
    from jprune.model import named_arrays

    arrays = {k: np.asarray(v) for k, v in named_arrays(model).items()}
    tensors = hf_tensors(hf_name_map(model.spec), arrays)
    config = export_config(hf_config, dtype_name(arrays), config_updates)
    with atomic_directory(out, force=force) as staging:
        write_tensors(staging, tensors, max_shard_bytes)
        write_metadata(staging, config, source, extra_files)
    return Path(out)


def loaded_dtype(dtype) -> np.dtype:
    """The dtype an array of ``dtype`` has in a loaded ``CausalLM`` (what ``save_model``
    writes): JAX keeps 64-bit types as 32-bit ones unless x64 is enabled."""
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def written_shapes(checkpoint: Checkpoint) -> dict[str, jax.ShapeDtypeStruct]:
    """HF name -> shape and dtype of every tensor ``save_model`` writes for the checkpoint
    loaded whole: the stored shapes (fused tensors are split and stacked back), the dtypes
    cast as asked and as a loaded model holds them."""
    return {
        theirs: jax.ShapeDtypeStruct(
            checkpoint.stored[theirs].shape, loaded_dtype(checkpoint.shapes[ours].dtype)
        )
        for ours, theirs in checkpoint.name_map.items()
    }


def convert_units(checkpoint: Checkpoint) -> list[list[str]]:
    """What ``convert`` reads at once, in order: the non-block tensors, then each block's."""
    blocks = [checkpoint.block_names(i) for i in range(checkpoint.spec.num_layers)]
    return [checkpoint.outer_names(), *blocks]


def convert_bytes(checkpoint: Checkpoint) -> int:
    """What ``convert`` holds at once besides the runtime (the README's bound), for its
    largest unit (``convert_units``) of a safetensors checkpoint: the unit as stored twice (the
    file's pages, mapped while they are read, and the arrays read from them), once more as
    written when it is cast (``--dtype``), and its fused tensors (Phi-3's qkv and gate_up,
    stacked experts) once more, stacked back. A ``pytorch_model.bin`` is held whole on top."""
    shapes = written_shapes(checkpoint)
    fused = fused_groups(checkpoint.name_map)

    def held(names: list[str]) -> int:
        tensors = {checkpoint.name_map[n] for n in names}
        stored = sum(nbytes(checkpoint.stored[t]) for t in tensors)
        cast = checkpoint.dtype is not None or any(
            shapes[t].dtype != checkpoint.stored[t].dtype for t in tensors
        )
        written = sum(nbytes(shapes[t]) for t in tensors) if cast else 0
        return 2 * stored + written + sum(nbytes(shapes[t]) for t in tensors if t in fused)

    return max(held(names) for names in convert_units(checkpoint))


def _write_unit(target: Mapping[str, SafetensorsFile], name_map: Mapping[str, str], arrays) -> None:
    """Write canonical-named ``arrays`` (a unit just read) into the files that hold them, as a
    loaded model holds them. A function of its own: nothing of the unit outlives it, so the
    next unit is read with this one gone."""
    arrays = {name: a.astype(loaded_dtype(a.dtype), copy=False) for name, a in arrays.items()}
    for theirs, tensor in hf_tensors(name_map, arrays).items():
        target[theirs].write(theirs, tensor)


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``source`` at ``out`` as ``save_model(*load_model(source, dtype), out,
    source=source)`` does, byte for byte, holding one block at a time.

    The output files are laid out up front from the tensor headers (``SafetensorsFile``);
    the checkpoint is then read through ``Checkpoint`` (which refuses non-finite weights) the
    non-block tensors first, then a block at a time, and each tensor is written at its place
    as soon as it is read. Everything goes to a staging directory renamed to ``out`` at the
    end (``atomic_directory``), so a failure leaves nothing at ``out``. Memory: one unit at
    a time (``convert_bytes``); a ``pytorch_model.bin`` source has no index, and
    ``Checkpoint`` loads it whole.
    """
    checkpoint = Checkpoint(source, dtype)
    shapes = written_shapes(checkpoint)
    sizes = {name: nbytes(shape) for name, shape in shapes.items()}
    files = shard_files(sizes, max_shard_bytes)
    embed = shapes[checkpoint.name_map["embed.weight"]]
    config = export_config(checkpoint.config, dtype_name({"embed.weight": embed}), None)
    with atomic_directory(out, force=force) as staging:
        with contextlib.ExitStack() as opened:
            target = {}
            for file, names in files.items():
                handle = SafetensorsFile(
                    staging / file, {n: shapes[n] for n in names}, SAFE_METADATA
                )
                opened.enter_context(handle)
                target |= dict.fromkeys(names, handle)
            for names in convert_units(checkpoint):
                _write_unit(target, checkpoint.name_map, checkpoint.read(names))
        if len(files) > 1:
            write_index(staging, files, sizes)
        write_metadata(staging, config, source)
    return Path(out)


class BlockShards:
    """A checkpoint written a block at a time, in the ``save_pretrained`` sharded layout.

    Decoder block ``i`` is shard ``i + 1`` of ``num_layers + 1``; the last shard holds the
    rest (embeddings, final norm, head). Each shard is written to a temporary name and renamed,
    so a shard that exists is complete (what resuming a run relies on); ``write_index`` lists
    them all once every one is there.
    """

    def __init__(self, directory: Path, spec: ModelSpec):
        self.directory = Path(directory)
        self.spec = spec
        self.name_map = hf_name_map(spec)
        self.count = spec.num_layers + 1

    def shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.count:05d}.safetensors"

    def _write(self, number: int, shapes: Mapping[str, Any], read) -> None:
        """Shard ``number`` holding the HF-named tensors of ``shapes``, each ``read(name)`` and
        written in turn (``SafetensorsFile``: the bytes ``save_file`` writes, without the
        whole file in memory), under a temporary name until it is complete."""
        final = self.directory / self.shard_name(number)
        partial = final.with_suffix(".tmp")
        with SafetensorsFile(partial, shapes, SAFE_METADATA, shown_as=final) as file:
            for name in shapes:  # in any order: the layout fixes every tensor's place
                file.write(name, read(name))
        os.replace(partial, final)

    def _write_arrays(self, number: int, arrays: Mapping[str, np.ndarray]) -> None:
        tensors = hf_tensors(self.name_map, arrays)
        self._write(number, tensors, tensors.__getitem__)

    def write_block(self, index: int, arrays: Mapping[str, np.ndarray]) -> None:
        """``arrays``: block ``index``'s canonical-named tensors (``layers.{index}.q.weight``)."""
        self._write_arrays(index + 1, arrays)

    def write_outer(self, checkpoint: Checkpoint) -> None:
        """The tensors outside the blocks (embeddings, final norm, head), read from
        ``checkpoint`` one at a time as they are written: a large vocabulary's embedding and
        head are not both in memory at once."""
        names = checkpoint.outer_names()
        if fused_groups({n: self.name_map[n] for n in names}):  # none of the families has one
            self._write_arrays(self.count, checkpoint.read(names))
            return
        ours = {self.name_map[n]: n for n in names}
        shapes = {theirs: checkpoint.shapes[n] for theirs, n in ours.items()}
        self._write(
            self.count, shapes, lambda theirs: checkpoint.read([ours[theirs]])[ours[theirs]]
        )

    def write_index(self) -> None:
        weight_map, total = {}, 0
        for number in range(1, self.count + 1):
            shard = self.shard_name(number)
            for name, shape in _safetensors_shapes(self.directory / shard).items():
                weight_map[name] = shard
                total += int(np.prod(shape.shape)) * shape.dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        text = json.dumps(index, indent=2) + "\n"
        with writing(self.directory / SAFE_INDEX, len(text)):
            (self.directory / SAFE_INDEX).write_text(text)
