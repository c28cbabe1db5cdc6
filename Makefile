# Two entry points: `make demo` (the main job on the built-in tiny model, offline, CPU)
# and `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m lora_lab.sweep +sweep=scheduler

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The report's browser test uses Debian's chromium and chromium-driver; installed here when
# missing and running as root (as CI does), otherwise that one test is skipped and says why.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
				|| echo "note: could not install chromium; the browser test will be skipped"; \
		else echo "note: chromium not installed; the browser test will be skipped"; fi; \
	fi

clean:
	rm -rf $(VENV) sweeps/*/ sweeps/.cache reports/*/
