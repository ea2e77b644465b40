"""The tracking server's basic-auth in the rehearsal, as infra/k8s/mlflow/ sets it up.

``mlflow server --app-name basic-auth`` reads its settings from the file named by
``MLFLOW_AUTH_CONFIG_PATH`` (``default_permission``, the permission store's ``database_uri``,
``admin_username``); the admin's first password comes from ``MLFLOW_AUTH_ADMIN_PASSWORD`` and the
CSRF key from ``MLFLOW_FLASK_SERVER_SECRET_KEY``. The permission store is a second database
(``mlflow_auth``) on the same PostgreSQL. The admin then creates the three identities over the REST
API (what ``mlflow.server.auth.client.AuthServiceClient.create_user`` sends).
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass, field
from pathlib import Path

ADMIN = "admin"
JOBS = "frcnn-jobs"  # the jobs' service identity: creates experiments, runs, registered models, versions
READER = "frcnn-reader"  # people browsing the UI
INFER = "frcnn-infer"  # the scheduled inference: reads the registry, logs its own runs
# Every authenticated identity may read; writing takes the permission a resource's creator gets
# (MANAGE) or an explicit grant. NO_PERMISSIONS would hide each experiment and model the jobs
# create from the reader and from inference until an admin granted it by hand.
DEFAULT_PERMISSION = "READ"


def _password() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Credentials:
    """The admin's password, the Flask secret key and one password per identity, made per run."""

    admin: str = field(default_factory=_password)
    flask_secret: str = field(default_factory=_password)
    users: dict[str, str] = field(default_factory=lambda: {u: _password() for u in (JOBS, READER, INFER)})

    def secrets(self) -> dict[str, str]:
        """Every secret value, by a name that says what it is (for the leak scans)."""
        return {"MLFLOW_AUTH_ADMIN_PASSWORD": self.admin, "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_secret,
                **{f"password of {u}": p for u, p in self.users.items()}}

    def env(self, user: str) -> dict[str, str]:
        """What a client of that identity carries (MLflow's client reads these two variables)."""
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.users[user]}


def write_auth_config(path: Path, pg_port: int) -> Path:
    path.write_text("[mlflow]\n"
                    f"default_permission = {DEFAULT_PERMISSION}\n"
                    f"database_uri = postgresql+psycopg://postgres@127.0.0.1:{pg_port}/mlflow_auth\n"
                    f"admin_username = {ADMIN}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


def server_env(config: Path, creds: Credentials) -> dict[str, str]:
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": creds.admin,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": creds.flask_secret}


def request(uri: str, method: str, path: str, body: dict | None = None,
            auth: tuple[str, str] | None = None) -> tuple[int, dict]:
    """One REST call to the tracking server; (HTTP status, JSON answer or {})."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(uri + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, {}


def create_users(uri: str, creds: Credentials) -> None:
    """The admin creates the three identities (idempotent: an existing user keeps its password)."""
    for user, password in creds.users.items():
        status, answer = request(uri, "POST", "/api/2.0/mlflow/users/create",
                                 {"username": user, "password": password}, auth=(ADMIN, creds.admin))
        if status != 200 and "already exists" not in json.dumps(answer):
            raise AssertionError(f"creating MLflow user {user}: HTTP {status} {answer}")
