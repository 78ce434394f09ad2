# xdpgw — run from the checkout root, as root.
#   make setup      install everything (Debian packages, kernel headers, .venv, bpffs)
#   make demo       run the demo
#   make test       run the test suite
#   make bench      run the benchmarks (KATRAN_SRC=DIR: a Katran checkout to time beside xdpgw)
#   make install    install into a venv under $(PREFIX), xdpgw on PATH, the systemd units
#   make fuzz       long fuzz run (XDPGW_FUZZ_EXAMPLES examples)
#   make clean      remove build artefacts (keeps .venv)
#   make distclean  clean, and remove .venv
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
XDPGW_FUZZ_EXAMPLES ?= 2000000
PREFIX   ?= /opt/xdpgw
BINDIR   ?= /usr/local/bin
UNITROOT ?= /

.PHONY: all setup demo test bench fuzz install clean distclean

all: test

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/xdpgw demo

# -q keeps pytest's closing summary line ("N passed in ...").
test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench $(if $(KATRAN_SRC),--katran-src $(KATRAN_SRC))

fuzz: setup
	XDPGW_FUZZ_EXAMPLES=$(XDPGW_FUZZ_EXAMPLES) $(PY) -m pytest -q tests/xdp/test_fuzz.py

# A wheel of the checkout, installed into its own venv (the Debian python with
# --system-site-packages, which bcc needs), `xdpgw` linked into $(BINDIR), and the
# units of the gateway and the center written by `xdpgw install-service` (under
# $(UNITROOT), / by default). Idempotent: a second run reinstalls the same files.
install: setup
	rm -rf build/wheel
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w build/wheel .
	test -x $(PREFIX)/bin/python || /usr/bin/python3 -m venv --system-site-packages $(PREFIX)
	$(PREFIX)/bin/pip install --quiet build/wheel/xdpgw-*.whl
	$(PREFIX)/bin/pip install --quiet --no-deps --force-reinstall build/wheel/xdpgw-*.whl
	mkdir -p $(BINDIR) && ln -sfn $(PREFIX)/bin/xdpgw $(BINDIR)/xdpgw
	$(PREFIX)/bin/xdpgw install-service --root $(UNITROOT) --bin $(PREFIX)/bin/xdpgw
	$(PREFIX)/bin/xdpgw install-service --root $(UNITROOT) --bin $(PREFIX)/bin/xdpgw --center

clean:
	rm -rf build dist *.egg-info .pytest_cache
	rm -f cython/*.c control/*.so dataplane/*.so dataplane/*.bpf.o
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f $(VENV)/.xdpgw-install-stamp

distclean: clean
	rm -rf $(VENV) .hypothesis
