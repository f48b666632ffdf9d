"""A Prefect server of our own on this machine, for schedules when no server is configured.

A flow called with no PREFECT_API_URL runs against Prefect's ephemeral API, which has no scheduler:
a cron schedule served against it is stored but never fires (Prefect warns "Cannot schedule flows
on an ephemeral server"). `prefect_api()` starts `prefect server start` (API, UI and scheduler) on
loopback for as long as the block runs, so `python -m flows.retrain --serve` keeps its schedule with
nothing else set up. When PREFECT_API_URL is set, that server is used and nothing is started.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from lmforge.errors import LmforgeError


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex((host, port)) != 0


def wait_until_healthy(api_url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise LmforgeError(f"the server for {api_url} exited with {process.returncode}: {tail[0]} (log: {log})")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise LmforgeError(f"the server for {api_url} did not answer within {timeout_s:.0f}s (log: {log})")


def stop_server(process: subprocess.Popen, grace_s: float = 30) -> None:
    """Ask a server to stop (SIGTERM), and kill it if it has not within `grace_s`."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()


@contextmanager
def prefect_api(port: int = 4200, host: str = "127.0.0.1", startup_timeout_s: float = 180) -> Iterator[str]:
    """The Prefect API URL to use: PREFECT_API_URL if set, else a server started here until the block ends."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    api_url = f"http://{host}:{port}/api"
    if not port_is_free(host, port):
        raise LmforgeError(f"--port {port}: something already listens on {host}:{port}; "
                           f"pass another port or set PREFECT_API_URL to that server")  # fmt: skip
    log = Path(PREFECT_HOME.value()) / f"server-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
               "--analytics-off"]  # fmt: skip
    with log.open("ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    previous = os.environ.get("PREFECT_API_URL")
    try:
        wait_until_healthy(api_url, process, log, startup_timeout_s)
        os.environ["PREFECT_API_URL"] = api_url  # for the flow-run processes the runner starts
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        stop_server(process)


@contextmanager
def ephemeral_api_settings() -> Iterator[None]:
    """Settings under which Prefect's ephemeral API (no PREFECT_API_URL) also starts on a new machine.

    Its first start migrates a new $PREFECT_HOME/prefect.db, which takes longer than Prefect's 20 s
    startup timeout on 2 cores ("Timed out while attempting to connect to ephemeral Prefect API
    server"); its telemetry, which cannot reach the internet here, fights the migration for the
    SQLite lock. A setting the user made in the environment wins.
    """
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    defaults = {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 300, PREFECT_SERVER_ANALYTICS_ENABLED: False}
    with temporary_settings(updates={setting: value for setting, value in defaults.items()
                                     if setting.name not in os.environ}):  # fmt: skip
        yield
