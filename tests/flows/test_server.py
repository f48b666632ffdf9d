"""The first flow run on a new machine: Prefect's ephemeral API must start on a new database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.flows.conftest import env_of_a_new_prefect_home

FIRST_FLOW_RUN = """
from prefect import flow
from flows.server import ephemeral_api_settings

@flow(name="first-run")
def first_run() -> int:
    return 42

with ephemeral_api_settings():
    print("result", first_run())
"""


def test_a_flow_runs_on_a_new_prefect_home(tmp_path: Path):
    """`make run` on a machine that never ran Prefect: the new database's migrations take longer than
    Prefect's 20 s default startup timeout on 2 cores; under ephemeral_api_settings the run completes."""
    env = env_of_a_new_prefect_home(tmp_path / "new-prefect-home", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", FIRST_FLOW_RUN], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "result 42" in result.stdout
    assert (tmp_path / "new-prefect-home/prefect.db").is_file()  # the database `prefect server start` shows


SETS_THE_GPU_LIMIT = """
from flows.pipeline import ensure_gpu_limit
ensure_gpu_limit(1)
print("limit set")
"""


def test_a_prefect_server_with_an_auth_string_serves_only_who_holds_it(tmp_path: Path):
    """infra/ runs `prefect server start` with PREFECT_SERVER_API_AUTH_STRING (an open Prefect API runs code
    on every worker): without it, or with a wrong one, nothing is served; lmforge's flows, given it as
    PREFECT_API_AUTH_STRING, work."""
    import base64
    import uuid

    import httpx

    from flows.server import stop_server, wait_until_healthy
    from tests.flows.conftest import free_port
    from tests.flows.test_trial_workers import start

    secret, port = f"admin:{uuid.uuid4().hex}", free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = env_of_a_new_prefect_home(tmp_path / "server-home", PREFECT_SERVER_API_AUTH_STRING=secret,
                                    PREFECT_SERVER_ANALYTICS_ENABLED="false")  # fmt: skip
    server = start([sys.executable, "-m", "prefect", "server", "start", "--port", str(port)], tmp_path, env,
                   tmp_path / "server.log")  # fmt: skip
    try:
        wait_until_healthy(api_url, server, tmp_path / "server.log", timeout_s=180)  # health needs no auth

        def basic(credentials: str) -> dict[str, str]:
            return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}

        assert httpx.post(f"{api_url}/flows/filter", json={}).status_code == 401
        assert httpx.post(f"{api_url}/flows/filter", json={}, headers=basic("admin:wrong")).status_code == 401
        assert httpx.post(f"{api_url}/flows/filter", json={}, headers=basic(secret)).status_code == 200
        client = env_of_a_new_prefect_home(tmp_path / "client-home", PREFECT_API_URL=api_url, PYTHONPATH=str(REPO))
        refused = subprocess.run([sys.executable, "-c", SETS_THE_GPU_LIMIT], cwd=REPO, env=client,
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
        assert refused.returncode != 0 and "401" in refused.stderr
        allowed = subprocess.run([sys.executable, "-c", SETS_THE_GPU_LIMIT], cwd=REPO, capture_output=True,
                                 env={**client, "PREFECT_API_AUTH_STRING": secret}, text=True, timeout=300)  # fmt: skip
        assert allowed.returncode == 0 and "limit set" in allowed.stdout, allowed.stderr[-2000:]
    finally:
        stop_server(server)
