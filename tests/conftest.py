import math
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

# XLA's compiler is most of this suite's time (below), and on CPU LLVM's optimizations are
# most of a compilation of these tiny programs: at -O0 they compile in about 40% less time,
# and the tiny models run as fast (their GEMMs are library calls either way). The arithmetic
# is not the same bits as at the default level (the elementwise and reduction loops are
# emitted differently), so every process of the suite, subprocesses included, uses the same
# flags (``xla_flags``): a test compares its runs with each other and with references within
# tolerances, never with a run made elsewhere.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(*extra: str) -> str:
    """The suite's XLA flags with ``extra`` ones, for a subprocess's environment."""
    return " ".join([os.environ["XLA_FLAGS"], *extra])


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. The suite compiles thousands of
    XLA programs in one process; kept for the whole session they exhausted it: the clean-clone
    run died in XLA's CPU compiler half way through (a segmentation fault compiling a small
    solver, the same test twice, although it passes on its own), plausibly at the kernel's
    limit of memory mappings (vm.max_map_count, 65530 here) that JIT-compiled code takes."""
    yield
    import jax

    jax.clear_caches()


# XLA's compiler is most of this suite's time (about 70% of the in-process tests' seconds, by
# jax.monitoring's compile events summed per file): most tests prune a tiny model once, and
# the programs they compile are compiled again by other tests, after the release above, in the
# other worker, and in the subprocesses. A persistent compilation cache shared by the workers
# and the subprocesses (which inherit the environment) turns those into reads: every program
# of the same computation and shapes runs the same executable, so no answer changes. Kept
# under .pytest_cache, so a second run on the same machine reuses it (a clean clone starts
# without one). Every program is cached, however quick to compile (JAX's defaults skip those
# under a second, nearly all of this suite's). One run writes about 60 MB; the oldest entries
# go past 512 MiB, so edits that change programs do not grow it without end.
COMPILATION_CACHE = ROOT / ".pytest_cache" / "jax-compilation"
CACHE_SETTINGS = {
    "jax_compilation_cache_dir": str(COMPILATION_CACHE),
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
    "jax_compilation_cache_max_size": 512 * 2**20,
}
for _name, _value in CACHE_SETTINGS.items():
    os.environ.setdefault(_name.upper(), str(_value))
if "jax" in sys.modules:  # imported before this file (by a plugin): its config is read already
    import jax

    for _name in CACHE_SETTINGS:
        jax.config.update(_name, type(CACHE_SETTINGS[_name])(os.environ[_name.upper()]))

# The longest files first: pytest-xdist's loadfile scheduling hands out whole files in
# collection order, and these are the longest (test_sharding's 8-device subprocess alone is
# about a third of one worker's time); started last, they ran alone at the end.
LONGEST_FIRST = ("test_sharding.py", "test_reconstruct.py", "test_streaming.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


# Where the engine or a contract is under test, not a method's quality: the optimization
# methods' cheapest settings (the suite's time budget).
CHEAP_OPTIONS = {
    "fista": {"num_bisect": 4, "maxiter": 6, "polish_iters": 8, "refit_iters": 8},
    "l0-admm": {"iterations": 8, "refit_iters": 8},
    "spap": {"num_stages": 10, "max_swaps": 5},
    "optima": {"maxiter": 16},
}

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_linears(model):
    for name, param in model.state_dict().items():
        if name.endswith(".weight") and any(f".{n}." in name for n in DECODER_LINEARS):
            yield name, param


def assert_exact_pattern(path, sparsity=None, nm=None):
    """Reload ``path`` in transformers and check every decoder linear of stories260K (5 blocks)
    holds exactly the pattern: ``d_in - floor(sparsity d_in)`` nonzeros per row, or n of m."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    count = 0
    for name, weight in decoder_linears(model):
        nonzero = (weight != 0).numpy()
        d_in = weight.shape[1]
        if nm is not None:
            n, m = nm
            per_group = nonzero.reshape(weight.shape[0], d_in // m, m).sum(-1)
            assert (per_group == n).all(), name
        else:
            assert (nonzero.sum(1) == d_in - math.floor(sparsity * d_in)).all(), name
        count += 1
    assert count == 5 * 7
    return model


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


def prune_with(model, method, **settings):
    """``jprune.prune`` with the configuration given as flat keywords (``PruneConfig.of``)."""
    import jprune.prune as jp
    from jprune.config import PruneConfig

    return jp.prune(PruneConfig.of(model, method, **settings))


def run_on_eight_devices(root, script_text: str, *args, timeout: int = 1200):
    """Run ``script_text`` in a subprocess with 8 virtual CPU devices; the JSON of its last
    line. The device count must be set before JAX starts, hence the subprocess."""
    import json
    import subprocess

    script = root / "run.py"
    script.write_text(script_text)
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
        "JAX_PLATFORMS": "cpu",
    }
    done = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
