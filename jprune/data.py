"""Text -> token ids, evaluation windows and calibration samples (protocol in METHODS.md).

Evaluation: tokenize the whole text once (BOS added once at the start), cut non-overlapping
windows of ``seqlen`` tokens, drop the remainder. Calibration: ``nsamples`` windows at random
starts ``randint(0, len(ids) - seqlen - 1)`` drawn with Python's ``random`` seeded by ``seed``,
the convention of the SparseGPT / Wanda lineage, so the same seed picks the same windows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jprune.errors import JpruneError

NAMED_DATASETS = ("wikitext2", "c4")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A checkpoint's text -> token ids, special tokens added as ``AutoTokenizer`` adds them.

    ``backend`` names the library that produces them: ``"tokenizers"`` (tokenizer.json alone,
    no torch) or ``"transformers"`` (``AutoTokenizer``, where the other would differ)."""

    encode: Callable[[str], Sequence[int]]
    backend: str


def _tokenizer_dir(model_dir: str | os.PathLike) -> Path:
    directory = Path(model_dir)
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        raise JpruneError(
            f"no tokenizer files in {str(directory)!r} (tokenizer.json, tokenizer.model or vocab.json)"
        )
    return directory


def load_hf_tokenizer(model_dir: str | os.PathLike):
    """transformers' ``AutoTokenizer`` of a checkpoint: for lm-eval, which needs its whole API.
    Importing it imports torch (about 250 MB resident)."""
    directory = _tokenizer_dir(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def load_tokenizer(model_dir: str | os.PathLike) -> TextTokenizer:
    """The checkpoint's tokenizer: its tokenizer.json through the ``tokenizers`` package
    wherever that gives ``AutoTokenizer``'s ids, else ``AutoTokenizer`` itself."""
    directory = _tokenizer_dir(model_dir)
    backend = _json_tokenizer(directory)
    if backend is not None:
        return TextTokenizer(functools.partial(_json_ids, backend), "tokenizers")
    return TextTokenizer(functools.partial(_hf_ids, load_hf_tokenizer(directory)), "transformers")


def _json_ids(backend, text: str) -> list[int]:
    return backend.encode(text).ids


def _hf_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]


# What transformers 5 (read at 5.25: AutoTokenizer.from_pretrained, the base _from_pretrained,
# TokenizersBackend.__init__) does with a tokenizer.json, as far as it changes ids:
# - The class is tokenizer_config.json's tokenizer_class, except for model types whose registered
#   class it substitutes for the declared one (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS); of
#   jprune's families that is qwen2 (Qwen2Tokenizer, which rebuilds a byte-level pipeline;
#   phi3's registered class is TokenizersBackend, no change).
# - TokenizersBackend (PreTrainedTokenizerFast is its alias) takes tokenizer.json as it is;
#   GemmaTokenizer rebuilds the BPE from its vocab and merges with a fixed normalizer and
#   pre-tokenizer (_gemma); other classes rebuild pipelines of their own, so AutoTokenizer.
# - add_bos_token / add_eos_token of tokenizer_config.json are dropped when a tokenizer.json
#   exists: its post-processor alone adds BOS (and EOS).
# - split_special_tokens becomes the backend's encode_special_tokens: stories260K reads a literal
#   "<unk>" in the text as text.
# - Special tokens that the config names but tokenizer.json lacks are added with new ids, and
#   added_tokens_decoder entries replace the file's: the file alone no longer says the ids.
# - Truncation and padding stored in tokenizer.json are switched off by __call__'s defaults.
_SUBSTITUTED_MODEL_TYPES = frozenset({"qwen2"})
_REFUSED_SETTINGS = ("auto_map", "from_slow")  # remote code; a conversion from tokenizer.model


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value) -> str | None:
    """A special token's text in tokenizer_config.json: a string or a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


def _special_tokens(config: dict[str, Any]) -> set[str]:
    """The texts of the special tokens that a tokenizer_config.json (or special_tokens_map.json)
    names: bos_token and the like, model-specific *_token, extra or additional special tokens."""
    tokens = [v for k, v in config.items() if k.endswith("_token") and isinstance(v, (str, dict))]
    for key in ("extra_special_tokens", "additional_special_tokens"):
        extra = config.get(key) or []
        tokens += list(extra.values()) if isinstance(extra, dict) else list(extra)
    return {_token_content(t) for t in tokens}


def _gemma(backend, config: dict[str, Any]):
    """GemmaTokenizer's pipeline over tokenizer.json's vocab and merges (its ``__init__``), or
    None where its BPE settings or its added tokens' ids would differ from the file's."""
    from tokenizers import normalizers, pre_tokenizers
    from tokenizers.models import BPE

    bpe = backend.model
    expected = {
        "dropout": None,
        "unk_token": _token_content(config.get("unk_token", "<unk>")),
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
    }
    if not isinstance(bpe, BPE) or any(getattr(bpe, k) != v for k, v in expected.items()):
        return None
    # The rebuilt backend gets its added tokens by content, which finds the vocabulary's ids.
    if any(bpe.token_to_id(t.content) != i for i, t in backend.get_added_tokens_decoder().items()):
        return None
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous", invert=False)
    return backend


def _as_is(backend, config: dict[str, Any]):
    return backend


_CLASS_PIPELINES = {
    "TokenizersBackend": _as_is,
    "PreTrainedTokenizerFast": _as_is,
    "GemmaTokenizer": _gemma,
    "GemmaTokenizerFast": _gemma,
}


def _json_tokenizer(directory: Path):
    """tokenizer.json as a ``tokenizers.Tokenizer`` set up as transformers sets it up, or None
    where transformers builds something that the file alone does not describe."""
    config = _read_json(directory / "tokenizer_config.json")
    model_type = _read_json(directory / "config.json").get("model_type")
    pipeline = _CLASS_PIPELINES.get(config.get("tokenizer_class"))
    if (
        pipeline is None
        or model_type in _SUBSTITUTED_MODEL_TYPES
        or any(config.get(key) for key in _REFUSED_SETTINGS)
        or not (directory / "tokenizer.json").is_file()
        or (directory / "added_tokens.json").is_file()
    ):
        return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    added = backend.get_added_tokens_decoder()
    named = _special_tokens(config)
    if "added_tokens_decoder" in config:
        saved = {
            int(i): {k: v for k, v in t.items() if k != "__type"}
            for i, t in config["added_tokens_decoder"].items()
        }
        if saved != {i: t.__getstate__() for i, t in added.items()}:
            return None
    else:
        named |= _special_tokens(_read_json(directory / "special_tokens_map.json"))
    if not named <= {t.content for t in added.values() if t.special}:
        return None
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return pipeline(backend, config)


def _named_dataset_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise JpruneError(
            f"dataset {name!r} needs the 'datasets' package (pip install 'jprune[datasets]'), or pass a text file"
        ) from None
    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(rows["text"])
        shard = (
            "en/c4-train.00000-of-01024.json.gz"
            if split == "train"
            else "en/c4-validation.00000-of-00008.json.gz"
        )
        rows = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
        return "\n\n".join(rows["text"][:3000])
    except Exception as err:  # offline: datasets raises connection errors of several types
        raise JpruneError(
            f"cannot load dataset {name!r} (offline? pass a local text file instead): {err}"
        ) from None


def read_text(source: str | os.PathLike, split: str = "test") -> str:
    """The text of a file, or of a named dataset (``wikitext2``, ``c4``) when online."""
    if str(source) in NAMED_DATASETS and not Path(source).exists():
        return _named_dataset_text(str(source), split)
    path = Path(source)
    if not path.exists():
        raise JpruneError(f"text file {str(path)!r} does not exist")
    if not path.is_file():
        raise JpruneError(f"text file {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise JpruneError(f"text file {str(path)!r} is not UTF-8 text: {err}") from None
    if not text.strip():
        raise JpruneError(f"text file {str(path)!r} is empty")
    return text


def tokenize(tokenizer: TextTokenizer, text: str) -> np.ndarray:
    """Token ids of the whole text, BOS once at the start (the tokenizer's own convention)."""
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def eval_windows(ids: np.ndarray, seqlen: int, source: str = "text") -> np.ndarray:
    """Non-overlapping (windows, seqlen) slices; the remainder is dropped."""
    if seqlen < 2:
        raise JpruneError(f"seqlen must be at least 2, got {seqlen}")
    count = len(ids) // seqlen
    if count == 0:
        raise JpruneError(
            f"{source} has {len(ids)} tokens, shorter than one window of seqlen={seqlen}"
        )
    return ids[: count * seqlen].reshape(count, seqlen)


def calibration_windows(
    ids: np.ndarray, nsamples: int, seqlen: int, seed: int, source: str = "text"
) -> np.ndarray:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random starts."""
    if nsamples < 1 or seqlen < 2:
        raise JpruneError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if nsamples * seqlen > len(ids) - 1:
        raise JpruneError(
            f"nsamples x seqlen = {nsamples} x {seqlen} = {nsamples * seqlen} tokens is more than "
            f"the {len(ids)} tokens of the calibration {source}"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return np.stack([ids[s : s + seqlen] for s in starts])
