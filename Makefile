# `make test` and `make demo` each set up .venv on a fresh machine by themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo results bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,mnist]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	MPLBACKEND=Agg $(PY) -m pytest -q

test-fast: $(STAMP)
	MPLBACKEND=Agg $(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	MPLBACKEND=Agg $(VENV)/bin/bmrs run

results: $(STAMP)
	MPLBACKEND=Agg $(PY) scripts/make_results.py

bench: $(STAMP)
	@for f in benchmarks/*.py; do echo "# $$f"; $(PY) $$f; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
