# Everything runs in a local .venv with pinned versions (requirements-dev.txt); torch==2.14.1 is
# installed from this machine's local package store.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
EXT := sparsekern/.extension-built
EXT_SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: all build test install-check train bench clean

all: build

$(DEPS): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements-dev.txt
	touch $@

# In-place build of sparsekern._C (ninja, incremental): the repo root is the import root.
$(EXT): $(DEPS) $(EXT_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(EXT)

test: build
	$(PY) -m pytest -q

# The README's own-environment install, checked as a user does it: wheel -> fresh venv outside
# the repository -> python -m lth.train and python -m benchmarks run from outside it.
install-check: build
	.ci/install-check $(PYTHON)

train: build
	$(PY) -m lth.train

bench: build
	$(PY) -m benchmarks linear

clean:
	rm -rf build sparsekern/_C*.so $(EXT)
