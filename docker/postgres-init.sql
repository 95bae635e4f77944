-- Run once by the postgres image on an empty data volume: MLflow's database beside
-- Airflow's (POSTGRES_DB), owned by the same user.
CREATE DATABASE mlflow;
