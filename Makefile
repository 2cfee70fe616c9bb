# Set-up is part of every target: a fresh machine needs only Python 3.11 and make.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup repro test bench ui lint

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip check
	touch $@

setup: $(BIN)/.installed

# The main job: prepare the embedded data, train every run in params.yaml, track in MLflow.
# Independent stages run JOBS at a time on one Ray (pipelines/repro.py); `dvc repro` works too.
JOBS ?= 4
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipelines.repro -j $(JOBS)

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/train_overhead.py

# Compare the runs side by side: http://127.0.0.1:5000 (it prints each experiment's runs view)
ui: setup
	$(BIN)/python -m pipelines.ui --backend-store-uri sqlite:///mlflow.db --port 5000
