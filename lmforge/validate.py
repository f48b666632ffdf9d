"""validate: data/raw/<dataset>/ -> reports/validation/<dataset>.json + Great Expectations Data Docs.

With `validate.on_failure: fail` a broken expectation writes the reports, then exits 3 with one
line naming the dataset, the expectation and a few offending values, so nothing downstream runs.

Each dataset gets up to four suites, each run on a view of its splits:
- `<dataset>.rows`     every row of every split: text present, length bounds, labels in the
                       declared set, words and tags of equal length, a response to every prompt;
- `<dataset>.balance`  classification: the share of each label in train, within bounds, all present;
- `<dataset>.tags`     token classification: every tag of every split in the declared tag set;
- `<dataset>.leakage`  one row per (text, split): a text in two splits is a leak.
The declared label set is the one in params (carried by the manifest), or train's own when null.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from lmforge.artifacts import SPLITS, DatasetValidation, ExpectationResult, Manifest, ValidateReport, ValidationSummary
from lmforge.data.splits import Partitions, partition_count, row_id, row_id_keys
from lmforge.errors import DataError, ValidationFailed
from lmforge.io import atomic_output_dir
from lmforge.params import Params
from lmforge.schema import ValidateParams
from lmforge.stage import Stage, dep, output

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no network here, and none wanted


BATCH_ROWS = 25_000  # rows of a split validated at once: memory does not grow with the dataset


@dataclass(frozen=True)
class View:
    """A table to validate, a batch at a time, and the expectations every batch must meet."""

    name: str
    batches: Callable[[], Iterator[pd.DataFrame]]
    expectations: list[Any]


def split_batches(dataset_dir: Path, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """Every split's rows, BATCH_ROWS at a time, with their split in a `split` column (an empty split: one empty
    batch, so that every expectation is evaluated)."""
    for split in SPLITS:
        file = pq.ParquetFile(dataset_dir / f"{split}.parquet")
        if file.metadata.num_rows == 0:
            empty = file.schema_arrow.empty_table().select(columns or file.schema_arrow.names)
            yield empty.to_pandas().assign(split=split)
        for batch in file.iter_batches(BATCH_ROWS, columns=columns):
            yield batch.to_pandas().assign(split=split)


def train_shares(dataset_dir: Path) -> pd.DataFrame:
    """Each label's share of the train split."""
    counts: Counter[str] = Counter()
    for batch in pq.ParquetFile(dataset_dir / "train.parquet").iter_batches(BATCH_ROWS, columns=["label"]):
        counts.update(batch.column("label").to_pylist())
    total = max(sum(counts.values()), 1)
    return pd.DataFrame({"label": [str(label) for label in counts],
                         "train_fraction": [count / total for count in counts.values()]})  # fmt: skip


def by_text(dataset_dir: Path, folder: Path) -> Callable[[], Iterator[pd.DataFrame]]:
    """One row per (text, split), partitioned by text (row id), so that a text's rows share a partition."""

    def batches() -> Iterator[pd.DataFrame]:
        size = sum((dataset_dir / f"{split}.parquet").stat().st_size for split in SPLITS)
        partitions = Partitions(folder, partition_count(4 * size))  # compressed files: about a quarter of the text
        for batch in split_batches(dataset_dir, ["text"]):
            texts = batch["text"].astype(str)
            partitions.add(batch[["text", "split"]], row_id_keys(row_id(text) for text in texts))
        partitions.close()
        yielded = False
        for part in partitions:
            yielded = True
            yield part.drop_duplicates()
        if not yielded:
            yield pd.DataFrame({"text": pd.Series(dtype=object), "split": pd.Series(dtype=object)})
        shutil.rmtree(folder)

    return batches


def build_views(manifest: Manifest, dataset_dir: Path, params: ValidateParams, scratch: Path) -> list[View]:
    """The views and expectations for one dataset (see the module docstring)."""
    import great_expectations.expectations as gxe

    task = manifest.kind
    row_checks: list[Any] = [
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=params.min_chars, max_value=params.max_chars),
    ]
    views = []
    if task == "classification":
        labels = manifest.label_set()
        row_checks.append(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels))
        balance = train_shares(dataset_dir)
        views.append(
            View(
                "balance",
                lambda: iter([balance]),
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
    elif task == "instruction":
        row_checks += [
            gxe.ExpectColumnValuesToNotBeNull(column="response"),
            gxe.ExpectColumnValueLengthsToBeBetween(
                column="response", min_value=params.min_chars, max_value=params.max_chars
            ),
        ]
    elif task == "token_classification":
        row_checks += [
            gxe.ExpectColumnPairValuesToBeEqual(column_A="n_words", column_B="n_tags"),
            gxe.ExpectColumnValuesToBeBetween(column="n_words", min_value=1, max_value=params.max_words),
        ]

        def tags() -> Iterator[pd.DataFrame]:
            for batch in split_batches(dataset_dir, ["tags"]):
                yield pd.DataFrame({"tag": [tag for sequence in batch["tags"] for tag in sequence]})

        views.append(
            View("tags", tags, [gxe.ExpectColumnValuesToBeInSet(column="tag", value_set=manifest.label_set())])
        )
    views.append(View("leakage", by_text(dataset_dir, scratch / "leakage"),
                      [gxe.ExpectColumnValuesToBeUnique(column="text")]))  # fmt: skip

    def rows() -> Iterator[pd.DataFrame]:
        for batch in split_batches(dataset_dir):
            if task == "token_classification":
                batch = batch.assign(n_words=batch["tokens"].map(len), n_tags=batch["tags"].map(len))
            # Only the columns the expectations read: GX copies the frame, and list columns are heavy.
            yield batch[[c for c in ("text", "label", "response", "n_words", "n_tags", "split") if c in batch.columns]]

    return [View("rows", rows, row_checks), *views]


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
    """Run every view's suite (a GX validation definition each) on each of its batches, and write the Data Docs
    site to docs_dir. A suite's outcome sums its batches: each expectation holds only if it held in every one."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    with tempfile.TemporaryDirectory(prefix="lmforge-gx-") as project:
        context = gx.get_context(mode="file", project_root_dir=project)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = context.data_sources.add_pandas(dataset)
        outcomes = []
        for view in views:
            batch = source.add_dataframe_asset(view.name).add_batch_definition_whole_dataframe("all")
            suite = context.suites.add(gx.ExpectationSuite(name=f"{dataset}.{view.name}"))
            for expectation in view.expectations:
                suite.add_expectation(expectation)
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=suite.name, data=batch, suite=suite)
            )
            per_batch = [
                [_outcome(suite.name, item, params.examples_in_error) for item in definition.run(
                    batch_parameters={"dataframe": frame},
                    result_format={"result_format": "SUMMARY", "partial_unexpected_count": params.examples_in_error},
                ).results]
                for frame in view.batches()
            ]  # fmt: skip
            outcomes += [combined(results, params.examples_in_error) for results in zip(*per_batch, strict=True)]
        context.build_data_docs()
        site = Path(project) / "gx" / "uncommitted" / "data_docs" / "local_site"
        shutil.copytree(site, docs_dir)
    return outcomes


def combined(results: tuple[ExpectationResult, ...], examples: int) -> ExpectationResult:
    """One expectation's outcome over all the batches of its view."""
    failed = [result for result in results if not result.success]
    return results[0].model_copy(update={
        "success": not failed,
        "unexpected_count": sum(result.unexpected_count for result in failed),
        "element_count": sum(result.element_count for result in results),
        "examples": [example for result in failed for example in result.examples][:examples] if failed
                    else results[0].examples,
    })  # fmt: skip


def explain_balance(outcome: ExpectationResult, views: list[View], params: ValidateParams) -> ExpectationResult:
    """A failed class-balance range check, naming the classes, their shares of train and the keys to change."""
    balance = next((next(view.batches()) for view in views if view.name == "balance"), None)
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
            views = build_views(manifest, dataset_dir, section, staging / ".scratch")
            outcomes = run_suites(dataset, views, section, staging / "data_docs" / dataset)
            outcomes = [explain_balance(outcome, views, section) for outcome in outcomes]
            report = summarize(dataset, manifest, outcomes, section)
            report.write_into(staging / f"{dataset}.json")
            reports[dataset] = report
            if not report.success:
                failures.append(failure_line(dataset, outcomes))
        shutil.rmtree(staging / ".scratch", ignore_errors=True)
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
