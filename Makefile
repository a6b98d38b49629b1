# rackboot: `make demo` and `make test` set up everything they need on a fresh Debian machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBS := qemu-system-arm qemu-utils u-boot-qemu u-boot-tools mtools dosfstools e2fsprogs \
        dnsmasq cpio gzip xz-utils zstd curl fdisk dpkg-dev python3-venv iproute2 bmap-tools kmod \
        chromium rsync nginx postgresql
STAMP_DEBS := $(VENV)/.debs-installed
STAMP_PIP := $(VENV)/.pip-installed

.PHONY: demo test check lint bench torture deps clean

# RACK=N: N blank workers switched on together on a rack network (a namespace with dnsmasq).
RACK ?=
demo: $(STAMP_DEBS) $(STAMP_PIP)
	$(VENV)/bin/rackboot demo -c examples/qemu-virt/rackboot.toml$(if $(RACK), --rack $(RACK))

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

# The fast tier, about two minutes: lint and types, no QEMU boots (e2e), none of the tests marked slow.
check: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not e2e and not slow"

# ruff (lint and format) and mypy (strict on the host side; the updater against Python 3.11).
lint: $(STAMP_DEBS) $(STAMP_PIP)
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/ruff format --check --quiet .
	$(PY) tools/typecheck

# Power cuts at random points of updates (CUTS=N SEED=S to change the run); fails if any bricks.
# make test cuts only the node key and the key chain (tests/e2e/test_torture.py); the
# default run here cuts every phase several times (tests/unit/test_qemu_torture.py checks).
CUTS ?= 50
SEED ?= 1
torture: $(STAMP_DEBS) $(STAMP_PIP)
	$(VENV)/bin/rackboot torture -c examples/qemu-virt/rackboot.toml --cuts $(CUTS) --seed $(SEED)

# TINY=1: each benchmark on a tiny input, a crash check; make test runs so all but build,
# netboot and rack (tests/integration/test_benchmarks.py).
bench: $(STAMP_DEBS) $(STAMP_PIP)
	$(if $(TINY),RACKBOOT_BENCH_TINY=1 )$(PY) benchmarks/run.py

deps: $(STAMP_DEBS)

# Debian packages, with arm64 and armhf enabled so `apt-get download PKG:ARCH` works, and
# the non-free-firmware component, where the Pi boot firmware (raspi-firmware) lives, from
# the archive the machine's own apt sources name (its local mirror, if it has one).
# apt-get update may warn about one mirror being mid-sync; the lists it did get are enough.
$(STAMP_DEBS):
	$(SUDO) dpkg --add-architecture arm64
	$(SUDO) dpkg --add-architecture armhf
	$(SUDO) sh tools/apt-firmware-source /
	$(SUDO) apt-get update -q || true
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(DEBS)
	@mkdir -p $(VENV) && touch $@

$(STAMP_PIP): setup.cfg pyproject.toml
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

clean:
	rm -rf build out .pytest_cache .typecheck .typecheck-cache .ruff_cache
