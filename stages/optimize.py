"""optimize: an Optuna study over a task's hyperparameters -> models/candidates/<task>/ + reports/optimize/<task>/.

The logic is lmforge/optimize.py; this command only parses the paths dvc.yaml gives (`--help` lists them).
"""

from lmforge.optimize import STAGE

if __name__ == "__main__":
    STAGE.main()
