"""A tracking server open to a network runs MLflow's basic-auth app: a real `mlflow server --app-name
basic-auth` on loopback with a generated admin password. No credentials: 401; a user with read access
only: cannot move @champion; lmforge with credentials from the environment: moves it."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.server import stop_server, wait_until_healthy
from lmforge import registry
from tests.flows.conftest import free_port
from tests.flows.test_trial_workers import start

ADMIN = "admin"


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(tracking URI, admin password) of a basic-auth MLflow server on loopback."""
    password = secrets.token_urlsafe(16)
    config = tmp_path / "basic_auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'auth.db'}\n"
                      f"admin_username = {ADMIN}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")  # fmt: skip
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}  # fmt: skip
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    server = start([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--port", str(port),
                    "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--workers", "1",
                    "--artifacts-destination", (tmp_path / "artifacts").as_uri()], tmp_path, env,
                   tmp_path / "mlflow.log")  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(uri, server, tmp_path / "mlflow.log", timeout_s=180)
        yield uri, password
    finally:
        stop_server(server)


def as_user(monkeypatch: pytest.MonkeyPatch, uri: str, user: str | None, password: str | None):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    return mlflow.MlflowClient(tracking_uri=uri)


def test_only_a_user_with_rights_moves_the_champion(auth_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    uri, password = auth_server
    admin = as_user(monkeypatch, uri, ADMIN, password)
    experiment = admin.create_experiment("auth")
    run = admin.create_run(experiment)
    (tmp_path / "model.txt").write_text("a model")
    admin.log_artifact(run.info.run_id, str(tmp_path / "model.txt"))
    admin.create_registered_model("auth-task")
    version = admin.create_model_version("auth-task", f"runs:/{run.info.run_id}/model.txt", run.info.run_id).version
    viewer_password = secrets.token_urlsafe(12)
    AuthServiceClient(uri).create_user("viewer", viewer_password)

    anonymous = as_user(monkeypatch, uri, None, None)
    with pytest.raises(MlflowException, match=r"401|Unauthorized|credentials"):
        anonymous.set_registered_model_alias("auth-task", registry.CHAMPION, version)
    viewer = as_user(monkeypatch, uri, "viewer", viewer_password)
    assert viewer.get_registered_model("auth-task").name == "auth-task"  # it may read (default READ) ...
    with pytest.raises(MlflowException, match=r"403|Permission denied|PERMISSION_DENIED"):
        viewer.set_registered_model_alias("auth-task", registry.CHAMPION, version)  # ... not move the champion

    as_user(monkeypatch, uri, ADMIN, password)  # lmforge reads the credentials from the environment
    registry.crown(registry.client(), "auth-task", str(version))
    assert registry.alias_version(registry.client(), "auth-task", registry.CHAMPION).version == version
