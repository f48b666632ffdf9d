"""The serving champion scored again on a candidate's test split, so the gate compares the same examples.

New data gives a new test split: the candidate is scored on today's, the champion's evidence is on the
split it was evaluated on, and a paired comparison needs both on the same examples. So the champion
is loaded from the registry the way the gate loads any version (lmforge's pyfunc), scored by the
evaluate code (lmforge/scoring.py) on the candidate's examples, and the result is recorded on its
version (`registry.record_rescore`): the MLflow UI then shows how the serving model does on today's data.

Before that, the rows the champion trained on (train and val, as its evaluate run recorded them in
eval/rows.parquet) are checked against today's test split. Splits are drawn row by row
(lmforge/data/splits.py), so with the same seed and fractions no row moves; a change of either
could put rows the champion learned from into the test split, where it would be scored on what it
memorised: the gate refuses that in one line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities.model_registry import ModelVersion

from lmforge import registry
from lmforge.artifacts import EvaluateReport
from lmforge.errors import DataError
from lmforge.gate import Evidence
from lmforge.schema import EvaluateParams
from lmforge.scoring import score_served

ROWS_ARTIFACT = "eval/rows.parquet"  # logged by evaluate beside the evidence: each row's id and split


def trained_rows(version: ModelVersion) -> set[str]:
    """The ids of the rows the version trained on (train) or was selected on (val)."""
    import mlflow

    where = f"{version.name} version {version.version}"
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=ROWS_ARTIFACT,
                                                        dst_path=folder)  # fmt: skip
        except Exception as error:
            if registry.not_found(error):
                raise DataError(f"{where}: its evaluate run holds no {ROWS_ARTIFACT}, so whether it trained on "
                                "today's test rows cannot be checked; it is not re-scored (to replace it, give "
                                "another version the alias champion in the MLflow UI)") from None  # fmt: skip
            raise registry.unavailable(f"reading the training rows of {where}", error) from None
        rows = pd.read_parquet(local)
    return set(rows.loc[rows["split"].isin(["train", "val"]), "row_id"])


def check_no_leak(version: ModelVersion, dataset_dir: Path) -> None:
    """Refuse, in one line, a champion that learned from rows now in the test split."""
    rows = pd.read_parquet(dataset_dir / "rows.parquet")
    test = set(rows.loc[rows["split"] == "test", "row_id"])
    leaked = sorted(trained_rows(version) & test)
    if leaked:
        raise DataError(
            f"{dataset_dir / 'rows.parquet'}: {len(leaked)} of {len(test)} test rows were training rows of the "
            f"champion ({version.name} version {version.version}; row ids {', '.join(leaked[:3])}): scored there "
            "it would be graded on what it memorised. The split changed (ingest.seed or ingest.split?): restore "
            "them, or give another version the alias champion in the MLflow UI"
        )


def rescore(served: Any, version: ModelVersion, candidate: Evidence, test: pd.DataFrame, labels: list[str],
            prompt_chars: int, params: EvaluateParams) -> Evidence:  # fmt: skip
    """The champion (`served`: its loaded pyfunc) scored on the candidate's test examples."""
    model = served.unwrap_python_model().task_model
    examples = test.head(candidate.metrics.test_examples)
    evaluation = score_served(model, examples, params, prompt_chars, labels=labels)
    report = EvaluateReport.model_validate({
        "task": candidate.metrics.task, "kind": candidate.metrics.kind, "test_examples": len(examples),
        "test_sha256": candidate.metrics.test_sha256, **evaluation.metrics,
        "baseline": {"name": "none"},
    })  # fmt: skip
    is_baseline = version.tags.get(registry.MODEL_KIND_TAG) == registry.BASELINE_KIND
    return Evidence(report, evaluation.per_example, is_baseline=is_baseline)
