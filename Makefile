# Set-up and the project's two entry points. Each target builds its own virtualenv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint docs bench-paper bench-amortized clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0   # the CPU build first: an open range could pull a CUDA build
	$(PIP) install -e ".[dev]"
	touch $@

demo: $(VENV)/.installed   ## fit the paper's three-mode target; writes demo_output/
	$(PY) tutorials/demo.py --out demo_output

test: $(VENV)/.installed   ## the whole test suite
	$(PY) -m pytest -q

bench-paper: $(VENV)/.installed   ## the paper's tables and figures, ours vs normflows; writes benchmarks/results/
	$(PIP) install -e ".[bench]"
	$(PY) benchmarks/paper.py --seeds 3 --out benchmarks/results

# the amortized benchmark runs in a virtualenv of its own (sbibm pins an old sbi and brings a large stack)
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_PIP := $(BENCH_PY) -m pip --disable-pip-version-check -q

$(BENCH_VENV)/.installed: pyproject.toml
	python3 -m venv $(BENCH_VENV)
	$(BENCH_PIP) install --upgrade pip
	$(BENCH_PIP) install torch==2.13.0   # the CPU build first: an open range could pull a CUDA build
	$(BENCH_PIP) install -e ".[bench]"   # sbi, sbibm==1.1.0, future with the other peers
	touch $@

bench-amortized: $(BENCH_VENV)/.installed   ## amortized inference on three sbibm tasks, ours vs sbi's NPE; writes benchmarks/results/amortized.*
	$(BENCH_PY) benchmarks/amortized.py --out benchmarks/results

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PIP) install -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed   ## the documentation site (API, tutorials, benchmark results); warnings are errors
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

clean:
	rm -rf $(VENV) $(BENCH_VENV) demo_output .pytest_cache docs/_build docs/api docs/tutorials docs/benchmarks docs/CHANGELOG.md
