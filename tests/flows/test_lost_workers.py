"""A worker lost as a whole: the automation on the Prefect server crashes a flow run whose heartbeats stopped."""

from __future__ import annotations

import time

import pytest
from prefect import flow


@flow(name="lost-worker-probe")
def probe() -> None:
    """Never run: its flow runs are made by hand, Running as a worker's are."""


def flow_run_state(run_id) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state.type.value


@pytest.mark.slow
def test_a_flow_run_whose_heartbeats_stop_is_crashed_and_one_that_ended_is_left_alone(harness):
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.states import Completed, Running

    from flows.lost_workers import ensure_lost_worker_automation

    first = ensure_lost_worker_automation(within_s=10)
    try:
        assert ensure_lost_worker_automation(within_s=10) == first  # created once
        with get_client(sync_client=True) as client:
            lost, ended = (client.create_flow_run(probe, name=name, state=Running()).id for name in ("lost", "ended"))
        for run_id in (lost, ended):  # each worker's heartbeat
            emit_event(event="prefect.flow-run.heartbeat",
                       resource={"prefect.resource.id": f"prefect.flow-run.{run_id}"})  # fmt: skip
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(ended, Completed())  # this one finishes; the other's worker is gone
        deadline = time.monotonic() + 90
        while flow_run_state(lost) != "CRASHED" and time.monotonic() < deadline:
            time.sleep(1)
        assert flow_run_state(lost) == "CRASHED"
        assert flow_run_state(ended) == "COMPLETED"
    finally:  # the server is the session's: a 10 s window would crash other tests' flow runs
        with get_client(sync_client=True) as client:
            client.delete_automation(first)
