"""The tag `gpu`: two flow runs on two workers never run their training stages at the same time.

Each worker is a separate process running a real flow run against the test's Prefect server; the
training stage is a real `dvc repro --single-item pretrain` in a tiny DVC repo of its own that
records when its command started and ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, sh

STAGE_SECONDS = 10  # long enough that two workers started together overlap
RECORD_SPAN = (
    f"import json, time; s = time.time(); time.sleep({STAGE_SECONDS}); "
    "json.dump([s, time.time()], open('span.json', 'w'))"
)

DVC_YAML = f"""
stages:
  pretrain:
    cmd: python -c "{RECORD_SPAN}"
    outs: [span.json]
"""

WORKER = """
import os
from prefect import flow
from flows.pipeline import stage_task
from lmforge.schema import OrchestrateParams

@flow(name="gpu-limit-worker")
def one_training_stage():
    return stage_task("pretrain", OrchestrateParams())("pretrain", dict(os.environ))

one_training_stage()
"""


def tiny_dvc_repo(root: Path) -> Path:
    root.mkdir()
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    (root / "dvc.yaml").write_text(DVC_YAML)
    return root


def spans_of_two_workers(tmp_path: Path, limit: int) -> list[tuple[float, float]]:
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import ensure_gpu_limit

    ensure_gpu_limit(limit)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    repos = [tiny_dvc_repo(tmp_path / f"limit{limit}-worker{i}") for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=repo, env=env) for repo in repos]
    assert [worker.wait(timeout=300) for worker in workers] == [0, 0]
    return sorted(tuple(json.loads((repo / "span.json").read_text())) for repo in repos)


def overlap(spans: list[tuple[float, float]]) -> bool:
    (_, first_end), (second_start, _) = spans
    return second_start < first_end


@pytest.mark.slow
def test_the_gpu_tag_serialises_training_stages_across_flow_runs(tmp_path: Path, harness):
    assert not overlap(spans_of_two_workers(tmp_path, limit=1))
    # The control: with two slots the same two workers do train at once, so the check above can fail.
    assert overlap(spans_of_two_workers(tmp_path, limit=2))


# As the pipeline flow does: the limit set (and its count checked) at the start of every flow run.
EPHEMERAL_WORKER = WORKER.replace(
    "from flows.pipeline import stage_task", "from flows.pipeline import ensure_gpu_limit, stage_task"
).replace("def one_training_stage():\n", "def one_training_stage():\n    ensure_gpu_limit(1)\n")


@pytest.mark.slow
def test_a_flow_run_killed_inside_a_training_stage_gives_its_gpu_slot_back(tmp_path: Path):
    """`lmforge run`'s default: each flow run on Prefect's ephemeral API, a new server on one database. One
    killed with SIGKILL inside its training stage never lets go of its `gpu` slot, and no lease is left to
    expire (they lived in the dead server's memory): the next flow run gives the slot back and trains."""
    from tests.flows.conftest import env_of_a_new_prefect_home

    env = {**env_of_a_new_prefect_home(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    stuck = tiny_dvc_repo(tmp_path / "killed")
    (stuck / "dvc.yaml").write_text(DVC_YAML.replace(RECORD_SPAN, "open('started', 'w'); import time; time.sleep(600)"))
    killed = subprocess.Popen([sys.executable, "-c", EPHEMERAL_WORKER], cwd=stuck, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (stuck / "started").exists():  # inside the stage, so inside the slot
            assert killed.poll() is None and time.monotonic() < deadline, "the first flow run never trained"
            time.sleep(0.2)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the flow run, its server, its dvc and its stage: nothing lets go
    killed.wait()
    after = tiny_dvc_repo(tmp_path / "after")
    assert subprocess.Popen([sys.executable, "-c", EPHEMERAL_WORKER], cwd=after, env=env).wait(timeout=180) == 0
    assert (after / "span.json").is_file()  # it trained
