# Two commands on a fresh machine:
#   make run    the main job: GPT-2 124M end to end (build, count, forward, script, compile, timings)
#   make test   the whole test suite
# Both create (or reuse) the virtual environment .venv and install gptfn with its test, tf
# (tensorflow reads OpenAI's checkpoints in the tests), plot and interop extras (gguf, onnx,
# onnxruntime and llama-cpp-python, which builds llama.cpp from source: about 6-9 minutes on
# 2 cores, once; the GGUF and ONNX tests run the exported files in those engines). When the
# environment has no torch, torch is installed first as the CPU wheel 2.13.0, so that the
# open `torch>=` range in pyproject.toml never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.gptfn-installed
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: run test setup clean

run: $(STAMP)
	$(PY) -m gptfn demo

test: $(STAMP)
	@# the fault-injection tests drive strace; where it is missing, try the system's packages
	@command -v strace >/dev/null || (apt-get update -qq && apt-get install -y -qq strace) \
		>/dev/null 2>&1 || echo "strace unavailable: the fault-injection tests will skip"
	@# two workers: one test process leaves half of a 2-core machine idle (subprocesses,
	@# engine start-ups); measured 12 minutes against 16 serially
	$(PY) -m pytest -q -n 2

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	@# llama-cpp-python builds llama.cpp: without its multimodal library (unused here),
	@# which is a third of the build
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -e ".[test,tf,plot,interop]"
	@# gptfn's C++ kernels (the CPU decode route: products, cached attention) compile once, here, rather
	@# than in the first test that needs them
	$(PY) -c "import gptfn.kernels as k; k.load()"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
