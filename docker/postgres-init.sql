-- Run once by the postgres image on an empty data volume, as the superuser: one login role per
-- service, each owning its own databases and able to connect to nothing else. Neither is a
-- superuser, nor may it create roles or databases. The passwords come from the container's
-- environment (psql's \getenv, PostgreSQL 15 and later), never from this file or a command line.
\set ON_ERROR_STOP on
\getenv airflow_password AIRFLOW_DB_PASSWORD
\getenv mlflow_password MLFLOW_DB_PASSWORD
\if :{?airflow_password}
\else
\set airflow_password ''
\endif
\if :{?mlflow_password}
\else
\set mlflow_password ''
\endif
SELECT :'airflow_password' = '' OR :'mlflow_password' = '' AS password_missing \gset
\if :password_missing
DO $$ BEGIN RAISE EXCEPTION 'AIRFLOW_DB_PASSWORD and MLFLOW_DB_PASSWORD must both be set'; END $$;
\endif

CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
-- Airflow's metadata; MLflow's runs and registry, and its basic-auth users (docker/mlflow-auth.ini)
CREATE DATABASE airflow OWNER airflow;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE ALL ON DATABASE airflow, mlflow, mlflow_auth FROM PUBLIC;
-- and the superuser's own (POSTGRES_DB, where this runs)
REVOKE ALL ON DATABASE :"DBNAME" FROM PUBLIC;
