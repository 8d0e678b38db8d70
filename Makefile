# The two commands a user needs: `make demo` and `make test`. Both set everything up on first use.
PY := .venv/bin/python
DEMO := demo

.PHONY: install test test-all demo bench clean

install:
	@bash tools/bootstrap.sh

test: install
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: install
	$(PY) -m pytest -q

demo: install
	$(PY) tools/demo.py --out $(DEMO)

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(DEMO) build *.egg-info engine/data/_jpegroi*.so .pytest_cache
