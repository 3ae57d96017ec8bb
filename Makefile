# The two commands a new user needs: `make report` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATASET ?= synthetic
PROFILE ?= full
PYTEST_ARGS ?=

.PHONY: venv test test-demo report report-check bench bench-data bench-eval bench-step bench-features bench-speedups bench-savings lab clean-runs

venv: $(STAMP)

# Reinstalls only when the pins or the package metadata change. pip runs with -qq: a package index
# configured with missing local folders prints a warning per package, which would flood the console.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet --upgrade pip
	$(PY) -m pip install --quiet --quiet -r requirements.txt
	$(PY) -m pip install --quiet --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name recsys --display-name "Python 3 (recsys)" >/dev/null
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-demo: $(STAMP)
	$(PY) -m pytest -q -m demo $(PYTEST_ARGS) tests/notebooks/test_demo_report.py

report: $(STAMP)
	$(PY) -m recsys_lib.pipeline --dataset $(DATASET) --profile $(PROFILE)

# The rendered report in headless Chromium (Debian's chromium): images, offline, console, width;
# screenshots in reports/$(DATASET)/screenshots/.
report-check: $(STAMP)
	$(PY) -m recsys_lib.report.browser_check reports/$(DATASET)/index.html --require timeline,example_users

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench-data: $(STAMP)
	$(PY) scripts/bench_data.py

bench-eval: $(STAMP)
	$(PY) scripts/bench_eval.py

bench-step: $(STAMP)
	$(PY) scripts/bench_train_step.py

bench-features: $(STAMP)
	$(PY) scripts/bench_features.py

# issue 27's exact speed-ups: the old and new code paths timed side by side, results compared
bench-speedups: $(STAMP)
	$(PY) scripts/bench_speedups.py

bench-savings: $(STAMP)
	$(PY) scripts/bench_savings.py

bench: $(STAMP)
	$(PY) scripts/bench_pipeline.py

clean-runs:
	rm -rf data/runs reports/*/
