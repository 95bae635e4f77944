# make run   : set everything up (venv, data, stores) and run one whole retraining
# make test  : the whole test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
PIP_FILTER := grep -v -e 'is ignored: it is neither a file nor a directory' || true

.PHONY: run test bench venv browser data airflow mlflow score clean-outputs help

help:
	@echo "make run | make test | make bench | make airflow | make mlflow | make score FOLDER=... | make clean-outputs"

$(BIN)/.installed: requirements.txt requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/python -m pip install --quiet -r requirements.txt -c requirements.lock 2>&1 | $(PIP_FILTER)
	set -o pipefail; $(BIN)/python -m pip install --quiet --no-deps -e . 2>&1 | $(PIP_FILTER)
	touch $@

venv: $(BIN)/.installed

data: venv
	$(BIN)/python -m pipeline generate-data --if-empty

# the retraining through Airflow (airflow dags test on .airflow/'s SQLite), then its summary
run: venv data
	started=$$(date +%s); $(BIN)/python -m pipeline airflow dags test retrain_anomaly_detector; status=$$?; \
	$(BIN)/python -m pipeline summary --newer-than $$started; exit $$status

# Airflow's UI, scheduler and API on http://localhost:8080 with this project's DAGs
airflow: venv data
	$(BIN)/python -m pipeline airflow standalone

test: venv browser
	$(BIN)/python -m pytest

# the benchmark suite (not tests): benchmarks/results.json and benchmarks/RESULTS.md; about an hour here.
# One of them: make bench BENCH="--only training"; a smoke run: make bench BENCH=--quick
bench: venv
	$(BIN)/python -m benchmarks $(BENCH)

# Debian's chromium for the browser test of the Airflow UI (Playwright drives it; no browser download)
browser:
	@command -v chromium >/dev/null || { \
	  [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	  echo "installing Debian's chromium for the UI test"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

mlflow: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

score: venv
	$(BIN)/python -m pipeline score $(FOLDER) --out scores.csv

clean-outputs:
	rm -rf data/raw data/manifest.parquet data/processed models reports
	git worktree prune; rm -rf runs
