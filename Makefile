# ramfs: `make demo` mounts a real image and shows it; `make test` runs the test-suite.
# Both install what they need (as root on Debian 12) and are quick when it is already there.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ramfs-installed

.PHONY: all deps venv test demo clean

all: test

deps:
	@bash scripts/install-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

venv: deps $(STAMP)

test: venv
	$(PY) -m pytest -q

demo: venv
	@bash scripts/demo.sh $(PY)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
