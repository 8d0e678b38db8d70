# The two commands a user needs: `make demo` and `make test`. Both set everything up on first use.
# `make lint` (ruff, then mypy; configs in ruff.toml and mypy.ini) runs in CI before the tests.
PY := .venv/bin/python
DEMO := demo

.PHONY: install test test-all lint demo bench gpu-check clean

install:
	@bash tools/bootstrap.sh

test: install
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check engine tools && $(PY) -m mypy engine tools

demo: install
	$(PY) tools/demo.py --out $(DEMO)

# BENCH_ARGS passes options to run_all.py, e.g. make bench BENCH_ARGS="--only loader,node"
bench: install
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# On a GPU machine: does the installed MegEngine build run this engine on these GPUs? (exit 1 on
# any FAIL; on a CPU machine it says there is nothing to check and exits 0)
gpu-check: install
	$(PY) tools/gpu_check.py

clean:
	rm -rf $(DEMO) build *.egg-info engine/data/_jpegroi*.so .pytest_cache .mypy_cache .ruff_cache
