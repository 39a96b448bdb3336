# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/finegrain fit --config configs/demo.yaml
	$(BIN)/finegrain test --config configs/demo.yaml --ckpt_path checkpoints/demo/best.ckpt

test: $(STAMP)
	$(BIN)/ruff check finegrain tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check finegrain tests
	$(BIN)/ruff format --check finegrain tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
