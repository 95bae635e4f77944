#!/usr/bin/env bash
# One-shot set-up run by docker-compose.yaml's `init` service (after minio-setup has made the
# buckets) before the Airflow roles start. Every step is idempotent: `make up` runs it each time.
set -euo pipefail
cd "${ANOMALY_PIPELINE_PROJECT:-/opt/anomaly-pipeline}"

# DVC's S3 remote goes in the git-ignored local config, so the committed default (a local
# folder, for `make run`) stays as it is; run workspaces copy this file (pipeline/workspace.py).
# No key goes in it: the workers have theirs in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.
python -m dvc remote add --local --force --default s3 "s3://${DVC_BUCKET}/anomaly-pipeline"
python -m dvc remote modify --local s3 endpointurl "${AWS_ENDPOINT_URL_S3}"

# Airflow's database and the `gpu` pool the train task runs in (ANOMALY_PIPELINE_GPU_SLOTS slots):
# what `make run` does on its local Airflow (pipeline/airflow_local.py), here on Postgres
python -m pipeline airflow pools list
echo "init: the DVC remote s3://${DVC_BUCKET}, Airflow's database and pool are ready"
