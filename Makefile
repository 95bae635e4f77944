# make run   : set everything up (venv, data, stores) and run one whole retraining
# make test  : the whole test suite (what CI runs)
# make test-fast : everything not marked slow, for the inner loop (under 5 minutes; the same Debian packages)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
# a quiet pip prints nothing, so grep's 'no line' status is ignored; pip's own failure is not (pipefail)
PIP_FILTER := { grep -v -e 'is ignored: it is neither a file nor a directory' || true; }

.PHONY: run test test-fast bench venv test-packages data airflow mlflow score up down clean-outputs help

help:
	@echo "make run | make test | make test-fast | make bench | make airflow | make mlflow | make score FOLDER=... | make up | make down | make clean-outputs"

$(BIN)/.installed: requirements.txt requirements-runtime.txt requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/python -m pip install --quiet -r requirements.txt -c requirements.lock 2>&1 | $(PIP_FILTER)
	set -o pipefail; $(BIN)/python -m pip install --quiet --no-deps -e . 2>&1 | $(PIP_FILTER)
	touch $@

venv: $(BIN)/.installed

data: venv
	$(BIN)/python -m pipeline generate-data --if-empty

# the retraining through Airflow (airflow dags test on .airflow/'s SQLite): one line per task as it
# ends, then the summary; Airflow's whole log goes to a file under .airflow/logs/ (pipeline/progress.py)
run: venv data
	@$(BIN)/python -m pipeline.progress retrain_anomaly_detector

# Airflow's UI, scheduler and API on http://127.0.0.1:8080 with this project's DAGs: this machine
# only (pipeline/airflow_local.py sets AIRFLOW__API__HOST; AIRFLOW__API__HOST=0.0.0.0 make airflow opens it)
airflow: venv data
	$(BIN)/python -m pipeline airflow standalone

test: venv test-packages
	$(BIN)/python -m pytest

test-fast: venv test-packages
	$(BIN)/python -m pytest -m "not slow"

# the benchmark suite (not tests): benchmarks/results.json and benchmarks/RESULTS.md; about an hour here.
# One of them: make bench BENCH="--only training"; a smoke run: make bench BENCH=--quick
bench: venv
	$(BIN)/python -m benchmarks $(BENCH)

# Debian packages the tests use, installed with apt-get (as root or through sudo) when missing:
# chromium for the browser test of the Airflow UI (Playwright drives it; no browser download),
# docker-compose to validate docker/docker-compose.yaml (no Docker engine needed), and
# postgresql and redis-server for Airflow on Celery with Postgres (servers the tests start).
test-packages:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	  echo "installing Debian's$$missing for the tests"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The scaled deployment (docker/docker-compose.yaml): needs a Docker engine with compose v2
# (COMPOSE="docker-compose" for v1) and docker/.env (from docker/.env.example, secrets set)
COMPOSE ?= docker compose
COMPOSE_ARGS := --env-file docker/.env -f docker/docker-compose.yaml
up:
	@test -f docker/.env || { echo "error: docker/.env is missing: cp docker/.env.example docker/.env and set its secrets"; exit 1; }
	@! grep -n '=change-me' docker/.env || { echo "error: docker/.env still holds change-me values (above): set them"; exit 1; }
	$(COMPOSE) $(COMPOSE_ARGS) up -d --build --wait

down:
	$(COMPOSE) $(COMPOSE_ARGS) down

mlflow: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

score: venv
	$(BIN)/python -m pipeline score $(FOLDER) --out scores.csv

clean-outputs:
	rm -rf data/raw data/manifest.parquet data/processed models reports
	git worktree prune; rm -rf runs
