# Every target uses the virtual environment in .venv/ (created by `make install`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# extra overrides of every reproduce target, e.g. REPRODUCE_ARGS=progress=results/progress_fashion_mnist.json
# (a reproduction continued across machines from its tracked progress file: docs/reproduction.md)
REPRODUCE_ARGS ?=

.PHONY: install demo check-demo test bench reproduce reproduce-teacher reproduce-calibrate reproduce-family \
	reproduce-table reproduce-ablation reproduce-quick reproduce-fp32 clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,dali]'  # dali: data.loader=dali and its tests (CPU mode here)
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

# The committed Fashion-MNIST table (docs/reproduction.md), in this order; each step reuses what the last built.
# The teacher once (<= 60 min; its SHA-256 is recorded and checked by every later step, and it is rebuilt when
# missing), the validation-split calibration, the table's main rows (<= 150 min), the later family's rows.
reproduce-teacher: install
	$(PY) -m compress_lit.reproduce part=teacher $(REPRODUCE_ARGS)

reproduce-calibrate: install
	$(PY) -m compress_lit.reproduce reproduce_preset=calibrate $(REPRODUCE_ARGS)

reproduce: install
	$(PY) -m compress_lit.reproduce part=main $(REPRODUCE_ARGS)

reproduce-family: install
	$(PY) -m compress_lit.reproduce part=family $(REPRODUCE_ARGS)

# the table from the runs finished so far, running nothing (an interrupted reproduction's progress)
reproduce-table: install
	$(PY) -m compress_lit.reproduce part=table $(REPRODUCE_ARGS)

reproduce-ablation: install
	$(PY) -m compress_lit.reproduce part=main ablation.enabled=true $(REPRODUCE_ARGS)

reproduce-quick: install
	$(PY) -m compress_lit.reproduce reproduce_preset=quick

# the table's AlexNet CompReSS-2q / -1q runs (seeds 0-2) again in fp32 (docs/reproduction.md#bf16-and-fp32);
# every target takes REPRODUCE_ARGS=precision=32-true (or bf16-mixed) over the presets' trainer.precision=auto
reproduce-fp32: install
	$(PY) -m compress_lit.reproduce reproduce_preset=fp32 $(REPRODUCE_ARGS)

clean:
	rm -rf outputs multirun .cache .pytest_cache
