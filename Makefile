# Two entry points: `make demo` (the main job on the built-in tiny model, offline, CPU)
# and `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every package at the version the tests passed with (Linux x86-64, CPython 3.11, as CI).
# `make lock` re-resolves it from pyproject.toml; `make upgrade-check` tries the newest.
LOCK := requirements.lock

.PHONY: demo test setup clean system-deps lock upgrade-check

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m lora_lab.sweep +sweep=scheduler

test: $(STAMP) system-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Two tests use Debian packages: the report's browser test (chromium, chromium-driver) and the
# shared-database workers test (postgresql). Installed here when missing and running as root
# (as CI does); otherwise those tests are skipped and say why.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
				|| echo "note: could not install$$missing; their tests will be skipped"; \
		else echo "note:$$missing not installed; their tests will be skipped"; fi; \
	fi

# Re-resolve the lock from pyproject.toml's ranges (needs the package index). torch stays at
# the release this project is tested with (TORCH_PINS).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
lock:
	$(PYTHON) -m venv .venv-tools
	.venv-tools/bin/python -m pip install --quiet pip-tools
	printf '%s\n' $(TORCH_PINS) > .venv-tools/torch-pins.txt
	.venv-tools/bin/pip-compile --quiet --extra test --strip-extras --no-emit-find-links \
		--no-emit-index-url --constraint .venv-tools/torch-pins.txt --output-file $(LOCK) pyproject.toml

# Not part of CI: the newest release of every dependency (our upper bounds lifted) in
# .venv-latest, what changed against the lock, and the tests' result there.
upgrade-check:
	$(PYTHON) .ci/upgrade_check.py

clean:
	rm -rf $(VENV) .venv-tools .venv-latest sweeps/*/ sweeps/.cache reports/*/
