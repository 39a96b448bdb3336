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

DEMO_DATA := data/synthbirds_large
# The first test photo of each of four species; the demo's `fit` synthesises the data, so list them at run time.
DEMO_PHOTOS = $$(awk 'NR == FNR { test[$$1] = $$2 == 0; next } test[$$1] { species = $$2; sub("/.*", "", species); \
	if (!(species in seen) && n++ < 4) { seen[species]; print "$(DEMO_DATA)/images/" $$2 } }' \
	$(DEMO_DATA)/train_test_split.txt $(DEMO_DATA)/images.txt)

demo: $(STAMP)
	$(BIN)/finegrain fit --config demo --overwrite true
	$(BIN)/finegrain test --config demo --ckpt_path checkpoints/demo/last.ckpt
	$(BIN)/finegrain predict $(DEMO_PHOTOS) --checkpoint checkpoints/demo/last.ckpt --top-k 3 \
		--save-viz checkpoints/demo/viz
	@echo
	@echo "See the demo model in a browser (then open http://127.0.0.1:8000/):"
	@echo "    $(BIN)/finegrain serve --checkpoint checkpoints/demo/last.ckpt"

test: $(STAMP)
	$(BIN)/ruff check finegrain tests
	$(BIN)/ruff format --check finegrain tests
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check finegrain tests
	$(BIN)/ruff format --check finegrain tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
