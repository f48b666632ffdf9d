"""A stage the flow starts ends with it: past its timeout, or when the flow's process is killed hard, the
whole tree (dvc, its shell, the stage and what the stage started) is ended; nothing trains on unseen."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows.stage_worker import StageFailed, dvc
from tests.conftest import REPO, sh

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def sleepy_repo(root: Path) -> tuple[Path, str]:
    """A DVC repository whose one stage starts a child of its own and sleeps; returns it and the child's marker.

    Its dep `mode` says "write" once: then the stage writes out/previous.txt and ends, as an earlier run."""
    marker = f"{random.randint(100_000, 999_999)}"
    root.mkdir()
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root, env=ENV)
    (root / "mode").write_text("sleep")
    command = ("python -c \"import pathlib, subprocess, time; out = pathlib.Path('out'); "
               "(out.mkdir(), (out / 'previous.txt').write_text('kept')) "
               "if pathlib.Path('mode').read_text() == 'write' else "
               f"(subprocess.Popen(['sleep', '{marker}']), time.sleep(600))\"")  # fmt: skip
    stage = {"cmd": command, "deps": ["mode"], "outs": ["out"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sleepy": stage}}))
    return root, marker


def alive(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if marker in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def gone(marker: str, within_s: float = 20) -> bool:
    deadline = time.monotonic() + within_s
    while alive(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not alive(marker)


def wait_for(marker: str, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while not alive(marker):
        assert time.monotonic() < deadline, "the stage never started"
        time.sleep(0.1)


def test_a_stage_past_its_timeout_is_ended_with_everything_it_started(tmp_path: Path):
    repo, marker = sleepy_repo(tmp_path / "repo")
    (repo / "mode").write_text("write")
    dvc("sleepy", ["repro", "sleepy"], repo, ENV)  # an earlier run's output, in dvc.lock and DVC's cache
    (repo / "mode").write_text("sleep")
    started = time.monotonic()
    with pytest.raises(StageFailed, match="ran past its timeout of 3s") as failed:
        dvc("sleepy", ["repro", "sleepy"], repo, ENV, timeout_s=3)
    assert failed.value.code == -signal.SIGTERM  # a signal: the flow retries it (and it resumes)
    assert time.monotonic() - started < 30
    assert gone(marker), [process.info["cmdline"] for process in alive(marker)]
    # DVC deleted the output before running the stage; it is back as dvc.lock records it
    assert (repo / "out" / "previous.txt").read_text() == "kept"


def test_a_stage_ends_when_the_flow_process_that_started_it_is_killed(tmp_path: Path):
    repo, marker = sleepy_repo(tmp_path / "repo")
    script = ("import os; from pathlib import Path; from flows.stage_worker import dvc; "
              f"dvc('sleepy', ['repro', 'sleepy'], Path({str(repo)!r}), dict(os.environ))")  # fmt: skip
    flow_process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)})
    try:
        wait_for(marker)
        flow_process.kill()  # SIGKILL: nothing of it runs any more
        flow_process.wait()
        assert gone(marker), [process.info["cmdline"] for process in alive(marker)]
    finally:
        for process in alive(marker):
            process.kill()


STREAMING_STAGE = """
import sys, time
from lmforge import progress
print("hello from the stage", file=sys.stderr, flush=True)
for step in (5, 8):  # as tqdm redraws its bar: a carriage return first, so a line printed after it is glued on
    sys.stderr.write(f"\\r{step * 10}%|#####     | {step}/10 [00:01<00:01, 5.00step/s]")
    progress.report(progress.Progress("finetune demo", step, 10, 3.0 / step, 1234.0, 2.0 * (10 - step)))
sys.stderr.write("\\r80%|########  | 8/10 [00:02<00:01, 5.00step/s, loss=0.375]")
print("a warning while the bar is shown", file=sys.stderr)
print("on stdout", flush=False)
"""


def test_a_running_stage_streams_its_lines_and_its_progress_into_the_flow_run(tmp_path: Path, harness):
    from prefect import flow, get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterFlowRunId
    from prefect.context import FlowRunContext
    from prefect.logging.handlers import APILogHandler

    repo = tmp_path / "repo"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo, env=ENV)
    (repo / "stage.py").write_text(STREAMING_STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"demo": {"cmd": "python stage.py",
                                                                        "deps": ["stage.py"]}}}))  # fmt: skip

    @flow
    def streamed() -> str:
        dvc("demo", ["repro", "demo"], repo, ENV)
        context = FlowRunContext.get()
        assert context is not None and context.flow_run is not None
        return str(context.flow_run.id)

    flow_run_id = streamed()
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["progress-demo"])))
    messages = [log.message for log in logs]
    assert {"hello from the stage", "a warning while the bar is shown", "on stdout"} <= set(messages)
    assert not any("5/10 [00:01" in message or "lmforge-progress" in message for message in messages)
    assert len(artifacts) == 1 and artifacts[0].type == "progress" and artifacts[0].data == 100.0
    # It stopped early at step 8 of 10 and exited 0: the bar is full, and says so.
    assert artifacts[0].description == "**finetune demo**: step 8 of 10, train loss 0.3750, 1,234 tokens/s, done"
