# `make test` and `make serve` set up .venv themselves: a fresh clone needs nothing else.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.splitserve-installed
# With no NVIDIA GPU the CPU build of PyTorch is installed first, so that nothing pulls a CUDA
# build of several GB. Point TORCH_CPU / PIP_EXTRA_INDEX_URL elsewhere where that pin differs.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test serve install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "installing PyTorch (CUDA)"; $(PY) -m pip install -q "torch>=2.11"; \
	  else \
	    echo "installing PyTorch (CPU): $(TORCH_CPU)"; $(PY) -m pip install -q "$(TORCH_CPU)"; \
	  fi; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

# Extra flags for `splitserve serve`, e.g. make serve SERVE_ARGS="--model /models/santacoder"
SERVE_ARGS ?=

serve: $(STAMP)
	$(VENV)/bin/splitserve serve $(SERVE_ARGS)

test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache
