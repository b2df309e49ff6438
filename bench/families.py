"""What each model family supports, generated from the test suite's outcomes.

Runs the tests that exercise the families (logit and perplexity parity with transformers,
round trips, pruning with exact sparsity on the reloaded checkpoint, structured export and
refusals), reads their outcomes from a JUnit XML report, and writes the table between the
markers of bench/RESULTS.md's "Model families" section. The pruning tests run every method
(sparsegpt, wanda, fista) at both patterns on every family here, where the suite runs a
pairwise cover. A cell is "yes" only when every test it names passed, "refused (tested)" when the test checks a one-line refusal, "FAILED" when
one of its tests failed, and "-" when no test covers it.

    .venv/bin/python bench/families.py          # runs the tests (about 15 minutes here)
    .venv/bin/python bench/families.py --xml F  # from an existing JUnit report
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"

TESTS = [
    "tests/test_models.py",
    "tests/test_families.py",
    "tests/test_evaluate.py::test_zoo_perplexity_matches_transformers",
    "tests/test_structured.py::test_zoo_exports_reload",
    "tests/test_structured.py::test_architecture_without_an_exportable_pair_is_refused",
    "tests/test_prune.py::test_exact_sparsity_after_reload",
    "tests/test_prune.py::test_prunes_opt_with_biases",
]
COLUMNS = ("convert", "eval", "unstructured", "N:M", "structured", "per-layer widths")

# family -> (zoo name, HF architecture); each cell: test-id regexes, and whether they test a
# refusal. llama's pruning runs on stories260K (a real LLaMA), OPT's structured on the zoo.
FAMILIES = {
    "LLaMA 2/3/3.x": ("llama3-gqa", "LlamaForCausalLM"),
    "Qwen2/2.5": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "Mistral": ("mistral", "MistralForCausalLM"),
    "Gemma 2": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma 3 (text)": ("gemma3", "Gemma3ForCausalLM"),
    "Phi-3": ("phi3", "Phi3ForCausalLM"),
    "Qwen3-MoE": ("qwen3-moe", "Qwen3MoeForCausalLM"),
    "Mixtral": ("mixtral", "MixtralForCausalLM"),
    "OPT": ("opt", "OPTForCausalLM"),
}


def cells(zoo: str) -> dict[str, tuple[list[str], bool]]:
    """Column -> (test-id patterns, is a refusal test)."""
    z = re.escape(zoo)
    prune = rf"test_pruned_family_reloads_exact\[{z}-\w+-"  # every method at that pattern
    out = {
        "convert": (
            [rf"test_logits_match_transformers\[{z}\]", rf"test_round_trip_is_bit_exact\[{z}\]"],
            False,
        ),
        "eval": ([rf"test_zoo_perplexity_matches_transformers\[{z}"], False),
        "unstructured": ([prune + r"0\.5\]"], False),
        "N:M": ([prune + r"2:4\]"], False),
        "structured": ([rf"test_structured_mlp_pruning_exports_stock_config\[{z}-"], False),
        "per-layer widths": ([rf"test_structured_refusals_name_the_family\[{z}-"], True),
    }
    if zoo == "llama3-gqa":
        out["unstructured"] = ([r"test_exact_sparsity_after_reload\[sparsegpt-target2\]"], False)
        out["N:M"] = ([r"test_exact_sparsity_after_reload\[wanda-target1\]"], False)
        out["structured"] = out["per-layer widths"] = (
            [r"test_zoo_exports_reload\[llama3-gqa-"],
            False,
        )
    if zoo == "opt":
        out["eval"] = ([r"test_zoo_perplexity_matches_transformers\[opt-project\]"], False)
        out["N:M"] = ([r"test_prunes_opt_with_biases"], False)
        out["structured"] = ([r"test_zoo_exports_reload\[opt-"], False)
        out["per-layer widths"] = ([r"test_architecture_without_an_exportable_pair"], True)
    if zoo in ("qwen3-moe", "mixtral"):
        out["structured"] = ([rf"test_structured_refusals_name_the_family\[{z}-"], True)
        out["per-layer widths"] = out["structured"]
    return out


def outcomes(xml_path: Path) -> dict[str, str]:
    """Test id (``file::name[params]``) -> passed / failed / skipped."""
    result = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        status = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            status = "failed"
        elif case.find("skipped") is not None:
            status = "skipped"
        result[f"{case.get('classname')}::{case.get('name')}"] = status
    return result


def cell(results: dict[str, str], patterns: list[str], refusal: bool) -> str:
    found = []
    for pattern in patterns:
        hits = [s for name, s in results.items() if re.search(pattern, name)]
        if not hits:
            return "-"
        found += hits
    if any(s != "passed" for s in found):
        return "FAILED"
    return "refused (tested)" if refusal else "yes"


def table(results: dict[str, str]) -> str:
    lines = [
        "| family | architecture | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for family, (zoo, architecture) in FAMILIES.items():
        row = [cell(results, *cells(zoo)[column]) for column in COLUMNS]
        lines.append(f"| {family} | `{architecture}` | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xml", type=Path, help="an existing JUnit XML report to read")
    args = parser.parse_args()
    xml = args.xml
    if xml is None:
        xml = Path(tempfile.mkdtemp()) / "families.xml"
        command = [sys.executable, "-m", "pytest", "-q", f"--junitxml={xml}", *TESTS]
        # every method at every pattern on every family, not the suite's pairwise cover
        env = {**os.environ, "JPRUNE_FULL_FAMILY_MATRIX": "1"}
        subprocess.run(command, cwd=ROOT, check=False, env=env)
    text = table(outcomes(xml))
    print(text)
    results = RESULTS.read_text()
    if BEGIN in results:
        before, rest = results.split(BEGIN, 1)
        results = before + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1]
    else:
        intro = "Generated by `bench/families.py` from the test suite's outcomes."
        results += f"\n## Model families\n\n{intro}\n\n{BEGIN}\n{text}\n{END}\n"
    RESULTS.write_text(results)


if __name__ == "__main__":
    main()
