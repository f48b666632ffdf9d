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


@pytest.mark.slow
def test_a_flow_run_killed_inside_a_training_stage_gives_its_gpu_slot_back(tmp_path: Path, harness):
    """Prefect holds a `gpu` slot on a lease its holder renews: a flow-run process killed with SIGKILL stops
    renewing it, the server takes it back, and the next flow run's training stage starts."""
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import ensure_gpu_limit

    ensure_gpu_limit(1)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    stuck = tiny_dvc_repo(tmp_path / "killed")
    (stuck / "dvc.yaml").write_text(DVC_YAML.replace(RECORD_SPAN, "open('started', 'w'); import time; time.sleep(600)"))
    killed = subprocess.Popen([sys.executable, "-c", WORKER], cwd=stuck, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (stuck / "started").exists():  # inside the stage, so inside the slot
            assert killed.poll() is None and time.monotonic() < deadline, "the first flow run never trained"
            time.sleep(0.2)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # the flow run, its dvc and its stage: nothing releases the slot
    killed.wait()
    started = time.time()
    after = tiny_dvc_repo(tmp_path / "after")
    assert subprocess.Popen([sys.executable, "-c", WORKER], cwd=after, env=env).wait(timeout=300) == 0
    waited = json.loads((after / "span.json").read_text())[0] - started
    assert waited < 150, f"the next training stage waited {waited:.0f}s for the slot"
