"""The tag `gpu`: two flow runs on two workers never run their training stages at the same time.

Each worker is a separate process running a real flow run against the test's Prefect server; the
training stage is a real `dvc repro --single-item pretrain` in a tiny DVC repo of its own that
records when its command started and ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
