"""``jprune convert`` a block at a time: the files ``save_model`` writes for the whole model,
byte for byte, from safetensors files laid out before their tensors are read."""

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM

from jprune.converters.hf import convert, load_model, save_model
from jprune.converters.safetensors_file import DTYPE_CODES, SafetensorsFile
from jprune.errors import JpruneError

import hf_zoo
from conftest import STORIES260K, STORIES_MINI


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _random_tensors(rng, count: int) -> dict[str, np.ndarray]:
    """Tensors of every dtype safetensors_file writes, scalars and empty ones among them."""
    dtypes = list(DTYPE_CODES)
    tensors = {}
    for i in range(count):
        dtype = dtypes[i % len(dtypes)]
        shape = tuple(int(d) for d in rng.integers(0, 5, size=rng.integers(0, 4)))
        name = f"layers.{rng.integers(0, 12)}.t{i}"
        tensors[name] = np.asarray(rng.standard_normal(shape) * 50).astype(dtype)
    return tensors


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_tensors_written_in_any_order_give_save_files_bytes(tmp_path, metadata):
    rng = np.random.default_rng(0)
    for trial in range(5):
        tensors = _random_tensors(rng, 3 * len(DTYPE_CODES))
        save_file(tensors, tmp_path / "reference", metadata=metadata)
        names = list(tensors)
        random.Random(trial).shuffle(names)
        with SafetensorsFile(tmp_path / "streamed", tensors, metadata) as file:
            for name in names:
                file.write(name, tensors[name])
        reference = (tmp_path / "reference").read_bytes()
        assert (tmp_path / "streamed").read_bytes() == reference, trial


def test_a_tensor_of_another_shape_twice_or_missing_is_refused(tmp_path):
    tensors = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float16)}
    file = SafetensorsFile(tmp_path / "x", tensors)
    with pytest.raises(JpruneError, match="read as float32 \\(3, 2\\)"):
        file.write("a", np.zeros((3, 2), np.float32))
    file.write("a", tensors["a"])
    with pytest.raises(JpruneError, match="not a tensor still to write"):
        file.write("a", tensors["a"])
    with pytest.raises(JpruneError, match="lacks tensor 'b'"):
        file.close()


def _whole_model_then_streamed(source, tmp_path, **options):
    """(save_model's files for the model loaded whole, convert's files)."""
    dtype = options.pop("dtype", None)
    model, config = load_model(source, dtype)
    whole = save_model(model, config, tmp_path / "whole", source=source, **options)
    streamed = convert(source, tmp_path / "streamed", dtype=dtype, **options)
    return _files(whole), _files(streamed)


@pytest.mark.parametrize(
    "arch", ["stories260K", "stories-mini", "phi3", "qwen3-moe", "mixtral", "opt-project", "gemma3"]
)
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_streamed_convert_writes_the_bytes_of_the_whole_model_path(
    zoo, assets, tmp_path, arch, dtype
):
    """Phi-3's fused qkv / gate_up and the mixtures' experts are split on reading and stacked
    back on writing a block at a time; every file, config and tokenizer too, is identical."""
    source = {"stories260K": STORIES260K, "stories-mini": STORIES_MINI}.get(arch) or zoo[arch]
    whole, streamed = _whole_model_then_streamed(source, tmp_path, dtype=dtype)
    assert "model.safetensors" in whole
    assert streamed.keys() == whole.keys()
    for name in whole:
        assert streamed[name] == whole[name], name


def test_streamed_convert_shards_as_save_model_does(zoo, tmp_path):
    whole, streamed = _whole_model_then_streamed(zoo["qwen2"], tmp_path, max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in whole and len(whole) > 4
    assert streamed == whole


def test_stacked_experts_and_a_torch_bin_convert_as_save_model_does(zoo, tmp_path):
    stacked = hf_zoo.write_stacked_expert_layout(
        Path(shutil.copytree(zoo["qwen3-moe"], tmp_path / "s"))
    )
    whole, streamed = _whole_model_then_streamed(stacked, tmp_path / "stacked")
    assert streamed == whole
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    shutil.copy(zoo["qwen2"] / "config.json", bin_only)
    state = AutoModelForCausalLM.from_pretrained(zoo["qwen2"], dtype=torch.float32).state_dict()
    torch.save(state, bin_only / "pytorch_model.bin")
    whole, streamed = _whole_model_then_streamed(bin_only, tmp_path / "from-bin")
    assert streamed == whole
