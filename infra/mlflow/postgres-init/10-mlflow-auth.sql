-- First start of the compose PostgreSQL: MLflow basic-auth's permission store (users,
-- grants) beside the tracking store `mlflow`. The Kubernetes manifests carry the same
-- statement (k8s/mlflow/postgres.yaml, ConfigMap postgres-initdb).
CREATE DATABASE mlflow_auth;
