-- One database per service: their migrations each keep an alembic_version table.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE DATABASE optuna;
CREATE DATABASE lmforge;  -- the promotion lock (LMFORGE_LOCK_URL)
