"""promote: register the task's candidate in the MLflow registry and gate it -> reports/promote/<task>.json.

The logic is lmforge/promote.py; this command only parses the paths dvc.yaml gives (`--help` lists them).
"""

from lmforge.promote import STAGE

if __name__ == "__main__":
    STAGE.main()
