-- One PostgreSQL server, two databases: Prefect's and MLflow's backend stores.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
