-- Run once by the postgres image on an empty data directory (docker-entrypoint-initdb.d).
-- MLflow gets a database of its own: Optuna and MLflow both keep their schema version in
-- an `alembic_version` table, so one database cannot hold both (MLflow then fails with
-- "Can't locate revision identified by 'v3.2.0.a'", Optuna's revision).
CREATE DATABASE mlflow;
