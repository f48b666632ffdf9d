"""optimize: an Optuna study over a fine-tuning task -> the candidate for promotion.

The logic is lmforge/optimize.py; this command parses the paths dvc.yaml gives (`--help` lists them)
and hands the stage the way to start trial workers beyond its own process (flows/trials.py).
"""

import dataclasses
import functools

from flows.trials import start_trial_workers
from lmforge import optimize

if __name__ == "__main__":
    dataclasses.replace(optimize.STAGE, run=functools.partial(optimize.run, trial_workers=start_trial_workers)).main()
