"""Processes that end with whoever started them: no stage left training behind a killed orchestrator.

`python -m lmforge.processes COMMAND...` runs COMMAND as the leader of its process group: when the
process that started it dies (the flow-run process killed hard; Linux's parent-death signal) or
tells it to end (SIGTERM: a timeout, a cancelled flow run), it ends the whole group, COMMAND and
everything COMMAND started (dvc, its shell, the stage), and only then itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

GRACE_S = 10.0  # between SIGTERM (checkpoints may finish writing) and SIGKILL


def die_with_parent(sent: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Have the kernel send `sent` to this process when its parent process ends (Linux's parent-death
    signal); False where there is no such thing. A parent that is gone already ends this process now:
    `parent` is the pid it started with, where it may have died before this call (a spawned process
    that took seconds to import)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid() if parent is None else parent
    ctypes.CDLL(None, use_errno=True).prctl(1, sent)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the signal was armed
        os.kill(os.getpid(), sent)
    return True


def end_own_group(signum: int, frame: FrameType | None) -> None:
    """SIGTERM to every process of this group but this one, SIGKILL to what is left after GRACE_S."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.1)
        except ChildProcessError:  # no child left; grandchildren may linger: SIGKILL below reaches them
            break
    os.killpg(0, signal.SIGKILL)  # this process included: the group is over


def lead(command: list[str]) -> int:
    """Run `command` in this process group until it exits; end the group when told to, or orphaned."""
    signal.signal(signal.SIGTERM, end_own_group)
    signal.signal(signal.SIGINT, end_own_group)
    die_with_parent(signal.SIGTERM)
    code = subprocess.call(command)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(lead(sys.argv[1:]))
