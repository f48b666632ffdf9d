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
