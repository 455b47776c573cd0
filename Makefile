# K-Net for Detectron2: common entry points. Every target installs what it needs first.
#   make test                 the fast tests: unit tests, no training runs (creates .venv on first use)
#   make test-all             every test: also training runs, tool runs, full-size models (CI)
#   make demo                 the main job: train + evaluate K-Net on the built-in toy data (CPU)
#   make demo TASK=semantic   the same for semantic K-Net (also: ade20k_sample, coco_sample_overfit)
#   make lint / make format   ruff checks and the import contracts / formatting
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
TASK ?= panoptic

.PHONY: venv test test-all demo lint format toy-data samples benchmark clean-venv

venv:
	@bash tools/setup_env.sh

test: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(PY) tools/run_demo.py --task $(TASK)

toy-data: venv
	$(PY) tools/make_toy_dataset.py

samples: venv
	$(PY) tools/prepare_samples.py

benchmark: venv
	$(PY) tools/benchmark.py

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean-venv:
	rm -rf $(VENV)
