# Two entry points: `make demo` (the main job on the built-in tiny model, offline, CPU)
# and `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[test]"
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

clean:
	rm -rf $(VENV) sweeps/*/ sweeps/.cache reports/*/
