import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
STORIES260K = ASSETS / "models" / "stories260K"
STORIES_MINI = ASSETS / "models" / "stories-mini"
CALIB_TEXT = ASSETS / "text" / "tinystories_calib.txt"
EVAL_TEXT = ASSETS / "text" / "tinystories_eval.txt"
WIKITEXT = ASSETS / "text" / "wikitext2_raw_test.txt"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return ASSETS


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Build each tiny random HF model once per session: name -> directory."""
    import hf_zoo

    root = tmp_path_factory.mktemp("zoo")
    return {name: hf_zoo.build(name, root / name) for name in hf_zoo.ARCHITECTURES}
