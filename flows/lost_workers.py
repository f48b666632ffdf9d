"""A worker lost as a whole: its flow run marked Crashed when its heartbeats stop, so the parent retries it.

A flow run that a worker starts sends a `prefect.flow-run.heartbeat` event every
PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (30 at least; set it in the workers' environment). A worker
whose machine is gone sends no more heartbeats, and no final state either: the flow run stays Running,
and the flow waiting on it (a routed stage, a trial worker) would wait forever. Prefect's answer is an
automation (its "zombie flows" recipe), created here on the server the flow uses: when a flow run's
heartbeat is not followed, within `orchestrate.lost_worker_s`, by another heartbeat or a final state,
the flow run is set to Crashed. The parent reads Crashed as a lost worker: transient, retried (exit 75).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

LOST_WORKERS = "lmforge: a flow run whose heartbeats stopped is crashed"
FINAL_EVENTS = ("Completed", "Failed", "Cancelled", "Crashed")


def lost_worker_automation(within_s: float) -> Any:
    """The automation: after a heartbeat, expect another heartbeat or a final state within `within_s`."""
    from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture, ResourceSpecification
    from prefect.client.schemas.objects import StateType

    return Automation(
        name=LOST_WORKERS,
        description="Sets a flow run whose worker stopped sending heartbeats to Crashed (flows/lost_workers.py).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in FINAL_EVENTS)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {within_s:g}s: its worker was lost")
        ],
    )


def ensure_lost_worker_automation(within_s: float) -> str:
    """The automation on the flow's Prefect server, created once (or updated to `within_s`); its id."""
    from prefect.automations import Automation

    wanted = lost_worker_automation(within_s)
    try:
        found = Automation.read(name=LOST_WORKERS)
    except ValueError:  # none by that name yet
        found = None
    if found is None:
        return str(wanted.create().id)
    if found.trigger != wanted.trigger or not found.enabled:
        wanted.id = found.id
        wanted.update()
    return str(found.id)
