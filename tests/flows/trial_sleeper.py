"""A trial worker process whose trials sleep: flows.trials.trial_process around a worker that never ends."""

from __future__ import annotations

import time
from typing import Any

from flows import trials


def sleep_forever(*args: Any) -> None:
    time.sleep(600)


def sleeping_trial_process() -> None:
    trials.worker_main = sleep_forever  # type: ignore[assignment]  # this spawned process's own module
    trials.trial_process(None, None, "none")  # type: ignore[arg-type]
