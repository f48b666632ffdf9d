"""validate: data/raw/<dataset>/ -> reports/validation/<dataset>.json + Great Expectations Data Docs.

With `validate.on_failure: fail` a broken expectation writes the reports, then exits 3 with one
line naming the dataset, the expectation and a few offending values, so nothing downstream runs.

Each dataset gets up to four suites, each run on a view of its splits:
- `<dataset>.rows`     every row of every split: text present, length bounds, labels in the
                       declared set, words and tags of equal length;
- `<dataset>.balance`  classification: the share of each label in train, within bounds, all present;
- `<dataset>.tags`     token classification: every tag of every split in the declared tag set;
- `<dataset>.leakage`  one row per (text, split): a text in two splits is a leak.
The declared label set is the one in params (carried by the manifest), or train's own when null.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lmforge.artifacts import SPLITS, DatasetValidation, ExpectationResult, Manifest, ValidateReport, ValidationSummary
from lmforge.errors import DataError, ValidationFailed
from lmforge.io import atomic_output_dir
from lmforge.params import Params
from lmforge.schema import ValidateParams
from lmforge.stage import Stage, dep, output

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no network here, and none wanted


@dataclass(frozen=True)
class View:
    """A table to validate and the expectations it must meet."""

    name: str
    frame: pd.DataFrame
    expectations: list[Any]


def build_views(manifest: Manifest, splits: dict[str, pd.DataFrame], params: ValidateParams) -> list[View]:
    """The views and expectations for one dataset (see the module docstring)."""
    import great_expectations.expectations as gxe

    task = manifest.kind
    rows = pd.concat([frame.assign(split=split) for split, frame in splits.items()], ignore_index=True)
    row_checks: list[Any] = [
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=params.min_chars, max_value=params.max_chars),
    ]
    views = []
    if task == "classification":
        labels = manifest.label_set()
        row_checks.append(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels))
        train = splits["train"]["label"].value_counts(normalize=True)
        balance = pd.DataFrame({"label": train.index.astype(str), "train_fraction": train.to_numpy()})
        views.append(
            View(
                "balance",
                balance,
                [
                    gxe.ExpectColumnValuesToBeBetween(
                        column="train_fraction",
                        min_value=params.min_class_fraction,
                        max_value=params.max_class_fraction,
                    ),
                    gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=labels),
                ],
            )
        )
    elif task == "token_classification":
        rows = rows.assign(n_words=rows["tokens"].map(len), n_tags=rows["tags"].map(len))
        row_checks += [
            gxe.ExpectColumnPairValuesToBeEqual(column_A="n_words", column_B="n_tags"),
            gxe.ExpectColumnValuesToBeBetween(column="n_words", min_value=1, max_value=params.max_words),
        ]
        tags = pd.DataFrame({"tag": [tag for sequence in rows["tags"] for tag in sequence]})
        views.append(
            View(
                "tags",
                tags,
                [gxe.ExpectColumnValuesToBeInSet(column="tag", value_set=manifest.label_set())],
            )
        )
    leakage = rows[["text", "split"]].drop_duplicates()
    views.append(View("leakage", leakage, [gxe.ExpectColumnValuesToBeUnique(column="text")]))
    # Only the columns the expectations read: GX copies the frame, and list columns are heavy.
    keep = [c for c in ("text", "label", "n_words", "n_tags", "split") if c in rows.columns]
    return [View("rows", rows[keep], row_checks), *views]


def _outcome(suite: str, result: Any, examples_in_error: int) -> ExpectationResult:
    config = result.expectation_config
    kwargs = config.kwargs
    column = kwargs.get("column") or f"{kwargs.get('column_A')}={kwargs.get('column_B')}"
    details = result.result or {}
    examples = list(details.get("partial_unexpected_list") or [])[:examples_in_error]
    if not examples and "observed_value" in details:
        examples = [details["observed_value"]]
    return ExpectationResult(
        suite=suite,
        expectation=config.type,
        column=str(column),
        success=bool(result.success),
        unexpected_count=int(details.get("unexpected_count") or (0 if result.success else 1)),
        element_count=int(details.get("element_count") or 0),
        examples=[example if isinstance(example, int | float | str) else str(example) for example in examples],
    )


def run_suites(dataset: str, views: list[View], params: ValidateParams, docs_dir: Path) -> list[ExpectationResult]:
    """Run every view's suite (a GX validation definition each) and write the Data Docs site to docs_dir."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    with tempfile.TemporaryDirectory(prefix="lmforge-gx-") as project:
        context = gx.get_context(mode="file", project_root_dir=project)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = context.data_sources.add_pandas(dataset)
        definitions = []
        frames = {}
        for view in views:
            batch = source.add_dataframe_asset(view.name).add_batch_definition_whole_dataframe("all")
            suite = context.suites.add(gx.ExpectationSuite(name=f"{dataset}.{view.name}"))
            for expectation in view.expectations:
                suite.add_expectation(expectation)
            definitions.append(
                context.validation_definitions.add(gx.ValidationDefinition(name=suite.name, data=batch, suite=suite))
            )
            frames[suite.name] = view.frame
        outcomes = []
        for definition in definitions:
            # Each view is its own dataframe, so each validation gets its own batch.
            result = definition.run(
                batch_parameters={"dataframe": frames[definition.name]},
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": params.examples_in_error},
            )
            outcomes += [_outcome(definition.name, item, params.examples_in_error) for item in result.results]
        context.build_data_docs()
        site = Path(project) / "gx" / "uncommitted" / "data_docs" / "local_site"
        shutil.copytree(site, docs_dir)
    return outcomes


def explain_balance(outcome: ExpectationResult, views: list[View], params: ValidateParams) -> ExpectationResult:
    """A failed class-balance range check, naming the classes, their shares of train and the keys to change."""
    balance = next((view.frame for view in views if view.name == "balance"), None)
    if outcome.success or balance is None or outcome.column != "train_fraction":
        return outcome
    low, high = params.min_class_fraction, params.max_class_fraction
    outside = balance[(balance["train_fraction"] < low) | (balance["train_fraction"] > high)]
    outside = outside.sort_values("train_fraction")
    shares = ", ".join(f"{label!r} {share:.1%}" for label, share in zip(outside["label"], outside["train_fraction"],
                                                                        strict=True))  # fmt: skip
    explanation = (f"{len(outside)} of {len(balance)} classes hold a share of train outside "
                   f"[validate.min_class_fraction {low}, validate.max_class_fraction {high}]: {shares}; "
                   "change those keys (or validate.on_failure: warn) if this balance is what you mean")  # fmt: skip
    return outcome.model_copy(update={"explanation": explanation})


def load_splits(dataset_dir: Path) -> dict[str, pd.DataFrame]:
    return {split: pd.read_parquet(dataset_dir / f"{split}.parquet") for split in SPLITS}


def summarize(dataset: str, manifest: Manifest, outcomes: list[ExpectationResult],
              params: ValidateParams) -> DatasetValidation:  # fmt: skip
    failed = [outcome for outcome in outcomes if not outcome.success]
    return DatasetValidation(
        dataset=dataset,
        success=not failed,
        on_failure=params.on_failure,
        test_sha256=manifest.test_sha256,
        evaluated=len(outcomes),
        failed=len(failed),
        expectations=outcomes,
    )


def failure_line(dataset: str, outcomes: list[ExpectationResult]) -> str:
    """One line naming the dataset, the first failed expectation and a few offending values."""
    failed = [outcome for outcome in outcomes if not outcome.success]
    more = f" (+{len(failed) - 1} more failed expectations)" if len(failed) > 1 else ""
    return f"validate: dataset {dataset!r}: {failed[0].describe()}{more}"


@dataclass(frozen=True)
class ValidatePaths:
    raw: Path = dep("data/raw: the ingested datasets")
    out: Path = output("reports/validation: a report and Data Docs per dataset")
    report: Path = output("whether each dataset passed")


def dataset_dirs(raw_dir: Path) -> list[Path]:
    """Every ingested dataset: a folder of data/raw with a manifest (the corpus has no splits)."""
    found = sorted(path.parent for path in raw_dir.glob("*/manifest.json") if path.parent.name != "corpus")
    if not found:
        raise DataError(f"{raw_dir}: no ingested datasets (run the ingest stage first)")
    return found


def run(section: ValidateParams, paths: ValidatePaths) -> ValidateReport:
    """Validate every dataset; write reports; raise ValidationFailed when one fails and on_failure is fail.

    reports/validate.json keeps, per dataset, whether it passed and how many expectations failed; it
    is written before a failure is raised, so `lmforge status` says what failed.
    """
    reports: dict[str, DatasetValidation] = {}
    failures: list[str] = []
    with atomic_output_dir(paths.out) as staging:
        for dataset_dir in dataset_dirs(paths.raw):
            dataset = dataset_dir.name
            manifest = Manifest.of(dataset_dir)
            views = build_views(manifest, load_splits(dataset_dir), section)
            outcomes = run_suites(dataset, views, section, staging / "data_docs" / dataset)
            outcomes = [explain_balance(outcome, views, section) for outcome in outcomes]
            report = summarize(dataset, manifest, outcomes, section)
            report.write_into(staging / f"{dataset}.json")
            reports[dataset] = report
            if not report.success:
                failures.append(failure_line(dataset, outcomes))
    passed = ValidateReport(datasets={name: ValidationSummary(success=r.success, evaluated=r.evaluated, failed=r.failed)
                                      for name, r in reports.items()})  # fmt: skip
    passed.write(paths.report)
    if failures and section.on_failure == "fail":
        raise ValidationFailed(failures[0] + f"; see {paths.out}/")
    for line in failures:
        print(f"warning: {line} (validate.on_failure is warn)")
    return passed


def summary(report: ValidateReport, paths: ValidatePaths) -> str:
    lines = [f"validate: {dataset}: {'passed' if r.success else 'FAILED'} {r.evaluated - r.failed}/{r.evaluated} "
             "expectations" for dataset, r in report.datasets.items()]  # fmt: skip
    return "\n".join([*lines, f"validate: reports and Data Docs in {paths.out}/"])


def section(params: Params, item: str | None) -> ValidateParams:
    return params.validate_


STAGE = Stage("validate", ("validate",), section, ValidatePaths, run, summary, lambda paths: paths.report,
              write_report=False)  # fmt: skip
