PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean models

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml requirements-pinned.txt requirements-embedded.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-pinned.txt
	$(BIN)/pip install -q --no-deps -r requirements-embedded.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tersa run tersa/recipes/default.yaml --output out/demo --overwrite

# The RAT+ model and its attention twin (tersa/recipes/*-shakespeare.yaml) in tersa's cache, where
# `trained:ratplus-shakespeare` / `trained:attention-shakespeare` find them. A model already there
# is kept (delete its folder to retrain); an interrupted training resumes from its checkpoint.
MODELS_DIR := $(or $(TERSA_CACHE),$(HOME)/.cache/tersa)/models
TRAINED := ratplus-shakespeare attention-shakespeare

models: $(STAMP)
	@for name in $(TRAINED); do \
	  if [ -f "$(MODELS_DIR)/$$name/config.json" ]; then \
	    echo "$$name: already in $(MODELS_DIR)/$$name"; \
	  else \
	    $(BIN)/tersa train tersa/recipes/$$name.yaml --output "$(MODELS_DIR)/$$name" --resume \
	      || exit 1; \
	  fi; \
	done

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	TRITON_INTERPRET=1 $(BIN)/pytest

clean:
	rm -rf $(VENV) out .pytest_cache
