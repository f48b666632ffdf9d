"""The flow retries a stage by the exit-code contract (lmforge/errors.py is_retried): real Prefect task runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.pipeline import retry_options
from flows.stage_worker import StageFailed
from lmforge.schema import OrchestrateParams


@pytest.mark.parametrize(
    ("failure", "attempts"),
    [(StageFailed("pretrain", 75, "the tracking server did not answer"), 2),
     (StageFailed("pretrain", -9, "its process was killed by SIGKILL"), 2),
     (ConnectionResetError("the Prefect API went away"), 2),
     (StageFailed("pretrain", 2, "pretrain.models.x: bad"), 1),
     (StageFailed("validate", 3, "expectation failed"), 1),
     (StageFailed("pretrain", 1, "Traceback: KeyError 'x'"), 1),  # a bug: it would only fail again
     (KeyError("a bug in the flow itself"), 1)],
)  # fmt: skip
def test_a_stage_is_retried_only_when_it_failed_transiently(failure: Exception, attempts: int, harness,
                                                            tmp_path: Path):  # fmt: skip
    from prefect import flow, task

    tries = tmp_path / "tries"

    def stage() -> str:
        tries.write_text(tries.read_text() + "x" if tries.exists() else "x")
        if len(tries.read_text()) == 1:
            raise failure
        return "done"

    settings = OrchestrateParams(retries=2, retry_delay_s=0)
    work = task(name="stage", **retry_options(settings))(stage)

    @flow
    def pipeline() -> str:
        return work()

    state = pipeline(return_state=True)
    assert len(tries.read_text()) == attempts
    assert state.is_completed() is (attempts == 2)
