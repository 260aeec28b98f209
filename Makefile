# ramfs: `make demo` mounts a real image and shows it; `make test` runs the test-suite.
# Both install what they need (as root on Debian 12) and are quick when it is already there.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ramfs-installed

.PHONY: all deps deps-test venv lint test demo clean

all: test

# FUSE, the compressors, a compiler for pyfuse3.
deps:
	@WANT_QEMU=0 bash scripts/install-deps.sh

# ... and QEMU 10 from bookworm-backports, which the tests use to make and restore images.
deps-test:
	@WANT_QEMU=1 bash scripts/install-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(STAMP)
	@bash scripts/link-entry.sh $(VENV)/bin/ramfs

# ruff (pyproject.toml [tool.ruff]) and mypy: every function of ramfs typed, ramfs/format
# and ramfs/image strictly (pyproject.toml [tool.mypy]). deps: the venv builds pyfuse3.
lint: deps venv
	$(PY) -m ruff check ramfs tests scripts bench mount.py
	$(PY) -m mypy ramfs

test: deps-test venv
	$(PY) -m pytest -q

demo: deps venv
	@bash scripts/demo.sh $(PY)

# Benchmarks against FUSE/disk/QEMU ceilings: writes docs/performance.md.
# BENCH_SIZES=4,8 (GiB of guest RAM), RAMFS_BENCH_CACHE=/var/tmp/ramfs-bench (cached images).
.PHONY: bench
bench: venv
	$(PY) bench/run.py

# Load and crash tests at full length: 16 readers for 60 s during conversions,
# the writer killed at 50 random points.
.PHONY: stress
stress: deps-test venv
	RAMFS_STRESS_SECONDS=60 RAMFS_KILL_POINTS=50 $(PY) -m pytest -q -s tests/test_stress.py \
		tests/test_crash_safety.py -k "concurrent or random_points"

# The structure-aware fuzzer at full length; make test runs a short bounded run.
.PHONY: fuzz
fuzz: deps-test venv
	$(PY) scripts/fuzz.py --cases 100000 --seed 1

# Volatility 3 and crash on four views of a Linux guest (docs/forensics.md,
# Testing). Opt-in, not part of make test: fetches an 858 MB debug kernel on the first run.
# IMAGE=..., QEMU_IMAGE=..., SYMBOLS=... (an ISF directory), VMLINUX=...; cache in
# RAMFS_FORENSICS_CACHE (default /var/tmp/ramfs-forensics).
.PHONY: forensics
forensics: deps-test venv
	$(PY) scripts/forensics.py $(if $(IMAGE),--image '$(IMAGE)') \
		$(if $(QEMU_IMAGE),--qemu-image '$(QEMU_IMAGE)') $(if $(SYMBOLS),--symbols '$(SYMBOLS)') \
		$(if $(VMLINUX),--vmlinux '$(VMLINUX)')

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
