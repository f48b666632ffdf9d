"""Flow tests: one real Prefect server (a temporary local one) for the session, and helpers for tests
that start Prefect processes of their own."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def env_of_a_new_prefect_home(prefect_home: Path, **settings: str) -> dict[str, str]:
    """This environment without any PREFECT_* setting (the harness's included), on a new PREFECT_HOME."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(prefect_home), **settings}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api(port: int, method: str, path: str, body: dict | None = None) -> Any:
    """One call to the Prefect REST API of the server on this port."""
    import httpx

    response = httpx.request(method, f"http://127.0.0.1:{port}/api{path}", json=body, timeout=10)
    response.raise_for_status()
    return response.json()
