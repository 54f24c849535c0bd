# Each target installs what it needs into .venv first (CPU torch pinned so no CUDA build is pulled).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install test test-slow gate demo bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install  ## lint, then the fast suite (what .ci/run calls first)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow and not gpu" -p no:cacheprovider

test-slow: install  ## scale tests: large synthetic checkpoints, peak-RSS checks
	$(PY) -m pytest -q -m "slow" -p no:cacheprovider

gate: install  ## perplexity regression gate on the bundled model
	$(VENV)/bin/qopt eval --check evals/baselines/gate.json

demo: install  ## the main job: full precision vs int8 vs 4-bit on the bundled model
	$(VENV)/bin/qopt eval --compare --windows 16

# QUICK=1: every benchmark end to end on small shapes in minutes, into evals/results/quick/ (never the committed JSONs)
bench: install  ## every benchmark (about 2 h on a quiet 2-core machine), then docs/benchmarks.md re-rendered
	$(PY) evals/run_all.py $(if $(filter 1,$(QUICK)),--quick,)

# NO_INSTALL=1: the python on PATH with what it has (BNB_PATH=DIR puts a bitsandbytes copy first on PYTHONPATH)
GPU_PY = $(if $(filter 1,$(NO_INSTALL)),python3,$(PY))
gpu-check: $(if $(filter 1,$(NO_INSTALL)),,install)  ## tests/test_gpu.py + decode / load benchmark on one GPU (< 8 min)
	PYTHONPATH=$(CURDIR)$(if $(BNB_PATH),:$(BNB_PATH)) $(GPU_PY) evals/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
