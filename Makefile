# devid-agent: set-up, tests and the demo.
# Both `make demo` and `make test` install what they need (Debian packages, a venv)
# and are cheap to re-run once that is done.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PACKAGES := swtpm swtpm-tools tpm2-tools libtss2-dev libsystemd-dev libcoap3-bin systemd libfaketime \
	mosquitto mosquitto-clients rsyslog rsyslog-gnutls curl zbar-tools softhsm2 postgresql \
	pkg-config autoconf automake libtool build-essential python3-venv python3-dev
# Parallel test workers; the machine has 2 cores and the tests mostly wait on swtpm.
TEST_WORKERS ?= 4

.PHONY: all deps apt venv peers test lint unit integration bench demo demo-down package package-test clean

all: test

deps: apt venv peers

# Install only what is missing, so a second run costs one dpkg-query.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install $$missing" >&2; exit 1; fi; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | apt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

# Test peers from npm (tests/peers: lwm2m-node-lib), at the versions package-lock.json pins.
PEERS := tests/peers
peers: $(PEERS)/node_modules/.installed

$(PEERS)/node_modules/.installed: $(PEERS)/package.json $(PEERS)/package-lock.json | apt
	@command -v npm >/dev/null || { echo "installing Debian packages: nodejs npm"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; }
	cd $(PEERS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

lint: venv
	$(VENV)/bin/ruff check agent tests bench swtpm

unit: venv
	$(VENV)/bin/pytest -q tests/unit

integration: venv
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) tests/integration

test: deps lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --durations=10 tests

bench: deps
	$(VPY) bench/tpm_ops.py
	$(VPY) bench/enroll.py
	$(VPY) bench/rotation.py
	$(VPY) bench/clock_skew.py
	$(VPY) bench/identity_api.py
	$(VPY) bench/broker.py

# Build the Debian package, lint it, install it here, check it, purge it
# (tests/package/run; needs root). `make package` only builds, into dist/.
package-test:
	bash tests/package/run

package:
	mkdir -p dist
	bash tests/package/run --build-only dist

demo: deps
	$(VPY) tests/stack.py demo --dir .demo

demo-down:
	-$(VPY) tests/stack.py demo --dir .demo --down

clean:
	rm -rf .demo .pytest_cache .ruff_cache build dist *.egg-info $(PEERS)/node_modules
