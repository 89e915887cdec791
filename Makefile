# lowbit developer entry points. `make demo` and `make test` each do all set-up from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is needed only by the tests (transformers as the oracle) and by .bin checkpoints; pin the CPU build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	@echo "lowbit: creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Build and install lowbit (C++ core + CUDA backend when nvcc is found) into the venv.
install: $(BIN)/python
	@echo "lowbit: building the C++ core and installing lowbit (1-3 minutes; CUDA kernels too when nvcc is found)"
	$(BIN)/python -m pip install -q .

demo: install
	@echo "lowbit: running the demo (downloads SmolLM2-135M-Instruct once, about 100 MB)"
	$(BIN)/lowbit demo

# llama.cpp itself (through llama-cpp-python, built from source by pip: several minutes the first time, then
# cached as a wheel) is the oracle of the tests that compare lowbit's bytes and file types with llama-quantize's.
LLAMA_CPP ?= llama-cpp-python==0.3.36

# torch goes in first so nothing pulls a CUDA build of it.
install-test: $(BIN)/python
	@echo "lowbit: installing torch (CPU build) for the tests' reference models"
	$(BIN)/python -m pip install -q "$(TORCH)"
	@echo "lowbit: building lowbit and installing the test oracles (transformers, gguf, bitsandbytes, openai, ...)"
	$(BIN)/python -m pip install -q ".[test,convert]" "$(TORCH)"
	@echo "lowbit: installing $(LLAMA_CPP) (pip builds llama.cpp from source: about 8 minutes the first time)"
	$(BIN)/python -m pip install -q "$(LLAMA_CPP)"

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python tests/bench/vs_llamacpp.py

clean:
	rm -rf build $(VENV)
