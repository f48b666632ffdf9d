"""evaluate: models/finetuned/<task> + the frozen test split -> reports/evaluate/<task>/ + an MLflow model.

The logic is lmforge/evaluate.py; this command only parses the paths dvc.yaml gives (`--help` lists them).
"""

from lmforge.evaluate import STAGE

if __name__ == "__main__":
    STAGE.main()
