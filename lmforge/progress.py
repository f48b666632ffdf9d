"""Progress of a training stage as lines, for whoever runs it without a terminal: the Prefect flow.

tqdm's bar is for a person at a terminal. With LMFORGE_PROGRESS=lines in its environment (the flow sets
it), a training stage also prints one line per logged step on stderr:

    lmforge-progress finetune sentiment: step 200/1000 loss 0.4123 tokens/s 21034 eta_s 340

and flows/stage_worker.py turns each into the stage's progress artifact in the Prefect UI.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

PROGRESS_ENV = "LMFORGE_PROGRESS"
PREFIX = "lmforge-progress "
# Searched for, not matched from the start: tqdm redraws its bar after a carriage return and no newline, so a
# line printed while a bar is shown arrives glued to the bar's last redraw.
LINE = re.compile(
    r"lmforge-progress (?P<what>.+?): step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>[-\d.einfa]+) "
    r"tokens/s (?P<tokens>[\d.]+) eta_s (?P<eta>[\d.]+)$"
)


@dataclass(frozen=True)
class Progress:
    what: str  # the training loop's description, e.g. "pretrain encoder (bert, mlm)"
    step: int
    total: int
    loss: float
    tokens_per_second: float
    eta_s: float

    @property
    def percent(self) -> float:
        return 100.0 * self.step / max(self.total, 1)

    def line(self) -> str:
        return (f"{PREFIX}{self.what}: step {self.step}/{self.total} loss {self.loss:.4f} "
                f"tokens/s {self.tokens_per_second:.0f} eta_s {self.eta_s:.0f}")  # fmt: skip

    @classmethod
    def parse(cls, line: str) -> Progress | None:
        found = LINE.search(line.strip())
        if found is None:
            return None
        return cls(found["what"], int(found["step"]), int(found["total"]), float(found["loss"]),
                   float(found["tokens"]), float(found["eta"]))  # fmt: skip

    def markdown(self, done: bool = False) -> str:
        minutes, seconds = divmod(round(self.eta_s), 60)
        to_go = "done" if done else f"about {minutes} min {seconds:02d} s to go"
        return (f"**{self.what}**: step {self.step:,} of {self.total:,}, train loss {self.loss:.4f}, "
                f"{self.tokens_per_second:,.0f} tokens/s, {to_go}")  # fmt: skip


def report(progress: Progress) -> None:
    """Print the progress line when the stage runs under the flow (nothing at a terminal: tqdm shows it)."""
    if os.environ.get(PROGRESS_ENV) == "lines":
        print(progress.line(), file=sys.stderr, flush=True)
