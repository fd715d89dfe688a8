# Every target uses the virtual environment in .venv/ (created by `make install`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo check-demo test bench reproduce reproduce-ablation reproduce-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m compress_lit.train

# a fresh clone's `make demo` (its own teacher cache, so the teacher is pretrained by the current code) into
# outputs/check-demo, then checks that README.md shows exactly the table it printed (CI runs it)
check-demo: install
	rm -rf outputs/check-demo outputs/check-demo-cache
	COMPRESS_LIT_CACHE=outputs/check-demo-cache $(PY) -m compress_lit.train hydra.run.dir=outputs/check-demo
	$(PY) tests/scripts/check_demo_numbers.py outputs/check-demo README.md

test: install
	$(PY) -m pytest -q

bench: install
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f; done

reproduce: install
	$(PY) -m compress_lit.reproduce

reproduce-ablation: install
	$(PY) -m compress_lit.reproduce ablation.enabled=true

reproduce-quick: install
	$(PY) -m compress_lit.reproduce reproduce_preset=quick

clean:
	rm -rf outputs multirun .cache .pytest_cache
