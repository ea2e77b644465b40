"""Create the three MLflow identities, or reset their passwords, as the basic-auth admin.

Run inside the MLflow server image (infra/mlflow/Dockerfile puts it at /opt/frcnn/create_users.py)
by the compose service ``mlflow-users`` and the Kubernetes Job ``mlflow-users``. Reads MLFLOW_URL,
MLFLOW_AUTH_ADMIN_PASSWORD and FRCNN_{JOBS,READER,INFER}_PASSWORD from the environment; prints one
line per identity, never a password. Idempotent: rotating a password is changing the Secret (or
.env) and running it again.
"""

import os
import sys
import time

import requests

USERS = {"frcnn-jobs": "FRCNN_JOBS_PASSWORD", "frcnn-reader": "FRCNN_READER_PASSWORD",
         "frcnn-infer": "FRCNN_INFER_PASSWORD"}


def wait_for_server(base: str, attempts: int = 60) -> None:
    for _ in range(attempts):
        try:
            requests.get(base + "/health", timeout=5).raise_for_status()
            return
        except requests.RequestException:
            time.sleep(5)
    sys.exit(f"{base}: the tracking server did not answer /health")


def main() -> None:
    base = os.environ["MLFLOW_URL"]
    wait_for_server(base)
    admin = ("admin", os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"])
    for user, key in USERS.items():
        body = {"username": user, "password": os.environ[key]}
        r = requests.post(base + "/api/2.0/mlflow/users/create", json=body, auth=admin, timeout=30)
        if r.status_code != 200:  # exists already: set the password from the Secret
            r = requests.patch(base + "/api/2.0/mlflow/users/update-password", json=body, auth=admin, timeout=30)
        if r.status_code != 200:
            sys.exit(f"{user}: HTTP {r.status_code} {r.text[:200]}")
        print(f"{user}: ok")


if __name__ == "__main__":
    main()
