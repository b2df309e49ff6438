"""Hugging Face checkpoint directories <-> jprune ``CausalLM``.

Reads ``config.json`` with ``model.safetensors``, sharded safetensors (an index file), or
``pytorch_model.bin``; writes the ``save_pretrained`` layout back. Tensor names go through one
explicit table per family; a tensor the table does not know is refused by name, a missing one
too. Saving writes into a temporary sibling directory and renames it at the end, so a failure
never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jprune.converters.spec import (
    ModelSpec,
    UnsupportedModelError,
    layer_widths,
    spec_from_hf_config,
)
from jprune.errors import JpruneError


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
_NAME_TABLES = {"llama": _LLAMA_NAMES, "qwen2": _LLAMA_NAMES, "opt": _OPT_NAMES}
# Buffers some older checkpoints carry that the forward recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_name_map(spec: ModelSpec) -> dict[str, str]:
    """Canonical name -> HF name for every tensor this spec's model holds."""
    table = _NAME_TABLES[spec.family]
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
    norm_kinds = ("weight", "bias") if spec.norm == "layer" else ("weight",)
    layer_names = [f"layers.{{i}}.{n}.{k}" for n in per_layer for k in norm_kinds]
    biases = {"q": spec.qkv_bias, "k": spec.qkv_bias, "v": spec.qkv_bias, "o": spec.o_bias}
    mlp_roles = ("gate", "up", "down") if spec.gated_mlp else ("up", "down")
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
    if parts[0] == "layers":
        template = ".".join(["layers", "{i}", *parts[2:]])
        return table[template].replace("{i}", parts[1])
    return table[canonical]


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


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    try:
        with safe_open(str(file), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
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


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint directory, by HF name, in their stored dtype."""
    directory = Path(path)
    if (directory / SAFE_WEIGHTS).is_file():
        return _read_safetensors(directory / SAFE_WEIGHTS)
    if (directory / SAFE_INDEX).is_file():
        index = json.loads((directory / SAFE_INDEX).read_text())
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(index["weight_map"].values())):
            if not (directory / shard).is_file():
                raise CheckpointError(f"shard {shard!r} named in {SAFE_INDEX} is missing")
            tensors.update(_read_safetensors(directory / shard))
        return tensors
    if (directory / BIN_WEIGHTS).is_file():
        return _read_torch_bin(directory / BIN_WEIGHTS)
    raise CheckpointError(
        f"no weights in {str(directory)!r}: expected {SAFE_WEIGHTS}, {SAFE_INDEX} or {BIN_WEIGHTS}"
    )


def canonical_arrays(
    spec: ModelSpec, tensors: Mapping[str, np.ndarray], dtype: str | None = None
) -> dict[str, np.ndarray]:
    """HF-named tensors -> canonical-named arrays; refuses missing and unknown tensors."""
    name_map = hf_name_map(spec)
    expected = set(name_map.values())
    tied_head = "lm_head.weight" if spec.tie_embeddings else None
    unknown = sorted(
        n
        for n in tensors
        if n not in expected and n != tied_head and not n.endswith(_IGNORED_SUFFIXES)
    )
    if unknown:
        raise UnsupportedModelError(
            f"checkpoint tensor {unknown[0]!r} is not handled by the {spec.family} converter"
        )
    missing = sorted(expected - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}")
    target = None if dtype is None else DTYPES[dtype]
    out = {}
    for ours, theirs in name_map.items():
        array = tensors[theirs]
        out[ours] = array if target is None else array.astype(target)
    return out


def load_model(path: str | os.PathLike, dtype: str | None = None):
    """Load an HF directory into a ``jprune.model.CausalLM``.

    Returns ``(model, hf_config)``. ``dtype`` (``float32``/``float16``/``bfloat16``) casts the
    stored weights; ``None`` keeps them as stored.
    """
    from jprune.model import CausalLM

    if dtype is not None and dtype not in DTYPES:
        raise JpruneError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config = read_config(path)
    spec = spec_from_hf_config(config)
    arrays = canonical_arrays(spec, read_tensors(path), dtype)
    _check_widths(config, spec, arrays)
    return CausalLM(spec, arrays), config


def _check_widths(config: Mapping[str, Any], spec: ModelSpec, arrays) -> None:
    """The MLP and value widths of the tensors are the ones the config declares, per layer."""
    widths = layer_widths(config, spec)
    for i in range(spec.num_layers):
        found = {
            "intermediate": arrays[f"layers.{i}.down.weight"].shape[1],
            "v_head": arrays[f"layers.{i}.v.weight"].shape[0] // spec.num_kv_heads,
        }
        for key, width in found.items():
            if width != widths[key][i]:
                raise CheckpointError(
                    f"layer {i}: tensors have {key} width {width}, the config says {widths[key][i]}"
                )


# ---------------------------------------------------------------- writing


@contextmanager
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


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def write_tensors(directory: Path, tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> None:
    """Write safetensors in the ``save_pretrained`` layout, sharded with an index when large."""
    tensors = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    shards = _shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SAFE_WEIGHTS), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map |= dict.fromkeys(shard, name)
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _dtype_name(arrays: Mapping[str, np.ndarray]) -> str:
    names = {v: k for k, v in DTYPES.items()}
    return names.get(next(iter(arrays.values())).dtype, "float32")


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
    name_map = hf_name_map(model.spec)
    tensors = {name_map[k]: v for k, v in arrays.items()}
    config = dict(hf_config)
    config["dtype"] = _dtype_name(arrays)
    config.pop("torch_dtype", None)
    config |= dict(config_updates or {})
    with atomic_directory(out, force=force) as staging:
        write_tensors(staging, tensors, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        src = Path(source) if source is not None else None
        generation = src / "generation_config.json" if src else None
        if generation is not None and generation.is_file():
            shutil.copy2(generation, staging / "generation_config.json")
        else:
            gen = {
                k: config[k]
                for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if config.get(k) is not None
            }
            (staging / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name in TOKENIZER_FILES if src else ():
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)
        # Remote modeling code the config points to travels with the weights.
        for ref in (config.get("auto_map") or {}).values() if src else ():
            module = f"{ref.split('.')[0]}.py"
            if (src / module).is_file():
                shutil.copy2(src / module, staging / module)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return Path(out)
