"""Wall time of ``jprune eval``'s perplexity computation against transformers (PyTorch, float32).

Both sides get the same token windows and batch size and are timed on the model already
loaded: JAX's first call (which includes jit compilation), then the minimum over ``--repeats``
steady-state calls; PyTorch (default attention, ``torch.no_grad``) the same way. The ratio
torch / jax > 1 means JAX is faster. Both perplexities must agree to 1e-5 relative, or the
script exits non-zero: a fast wrong number is not a result.

    .venv/bin/python bench/eval_speed.py --model ../shared/assets/models/stories260K \\
        --text ../shared/assets/text/tinystories_eval.txt --repeats 5
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from common import load_average, machine, timed

RTOL = 1e-5


def torch_perplexity(hf_model, windows: np.ndarray, batch_size: int) -> float:
    import torch

    total = 0.0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            ids = torch.as_tensor(windows[start : start + batch_size], dtype=torch.long)
            logits = hf_model(ids).logits[:, :-1]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
            )
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory")
    parser.add_argument("--text", required=True, help="evaluation text file")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="windows per forward (default: 8)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="steady-state calls per side; the min is kept (default: 3)",
    )
    args = parser.parse_args(argv)
    load_before = load_average()[0]

    import torch
    from transformers import AutoModelForCausalLM

    from jprune.converters.hf import load_model
    from jprune.data import eval_windows, load_tokenizer, read_text, tokenize
    from jprune.evaluate import perplexity

    windows = eval_windows(tokenize(load_tokenizer(args.model), read_text(args.text)), args.seqlen)
    model, _ = load_model(args.model)
    hf_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    jax_first, jax_best, ours = timed(
        lambda: perplexity(model, windows, batch_size=args.batch_size).perplexity,
        repeats=args.repeats,
    )
    torch_first, torch_best, ref = timed(
        torch_perplexity, hf_model, windows, args.batch_size, repeats=args.repeats
    )

    name = os.path.basename(os.path.normpath(args.model))
    print(f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"1-min load average: {load_before:.2f} before, {load_average()[0]:.2f} after")
    print(f"attention: torch {hf_model.config._attn_implementation}")
    print(
        f"{windows.shape[0]} windows x {args.seqlen} tokens, batch {args.batch_size}, "
        f"min of {args.repeats} steady-state calls"
    )
    print()
    print(
        "| model | ppl jax | ppl torch | jax first call (s) | jax steady (s) | torch first call (s) | torch steady (s) | torch / jax |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {name} | {ours:.4f} | {ref:.4f} | {jax_first:.2f} | {jax_best:.2f} | "
        f"{torch_first:.2f} | {torch_best:.2f} | {torch_best / jax_best:.2f} |"
    )
    if not math.isclose(ours, ref, rel_tol=RTOL):
        print(
            f"perplexities disagree: jax {ours!r} vs torch {ref!r} (rtol {RTOL})", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
