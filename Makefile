# xdpgw — run from the checkout root, as root.
#   make setup      install everything (Debian packages, kernel headers, .venv, bpffs)
#   make demo       run the demo
#   make test       run the test suite
#   make bench      run the benchmarks
#   make fuzz       long fuzz run (XDPGW_FUZZ_EXAMPLES examples)
#   make clean      remove build artefacts (keeps .venv)
#   make distclean  clean, and remove .venv
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
XDPGW_FUZZ_EXAMPLES ?= 2000000

.PHONY: all setup demo test bench fuzz clean distclean

all: test

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/xdpgw demo

# -q keeps pytest's closing summary line ("N passed in ...").
test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench

fuzz: setup
	XDPGW_FUZZ_EXAMPLES=$(XDPGW_FUZZ_EXAMPLES) $(PY) -m pytest -q tests/xdp/test_fuzz.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
	rm -f cython/*.c control/*.so dataplane/*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f $(VENV)/.xdpgw-install-stamp

distclean: clean
	rm -rf $(VENV) .hypothesis
