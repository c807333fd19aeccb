# Two commands on a fresh machine:
#   make run    the main job: GPT-2 124M end to end (build, count, forward, script, compile, timings)
#   make test   the whole test suite
# Both create (or reuse) the virtual environment .venv and install gptfn with its test and
# tf extras (tensorflow reads OpenAI's checkpoints in the tests). When the
# environment has no torch, torch is installed first as the CPU wheel 2.13.0, so that the
# open `torch>=` range in pyproject.toml never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.gptfn-installed

.PHONY: run test setup clean

run: $(STAMP)
	$(PY) -m gptfn demo

test: $(STAMP)
	@# the fault-injection tests drive strace; where it is missing, try the system's packages
	@command -v strace >/dev/null || (apt-get update -qq && apt-get install -y -qq strace) \
		>/dev/null 2>&1 || echo "strace unavailable: the fault-injection tests will skip"
	$(PY) -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[test,tf,plot]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
