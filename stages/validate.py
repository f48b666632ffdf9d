"""validate: data/raw/<dataset>/ -> reports/validation/<dataset>.json + Great Expectations Data Docs.

With `validate.on_failure: fail` a broken expectation writes the reports, then exits non-zero with
one line naming the dataset, the expectation and a few offending values, so nothing downstream runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lmforge.errors import DataError, ValidationFailed, run_main
from lmforge.io import atomic_output_dir, read_json, write_json, write_json_atomic
from lmforge.params import ValidateParams, load_params
from lmforge.validation import build_views, failure_line, load_splits, run_suites, summarize


def dataset_dirs(raw_dir: Path) -> list[Path]:
    """Every ingested dataset: a folder of data/raw with a manifest (the corpus has no splits)."""
    found = sorted(path.parent for path in raw_dir.glob("*/manifest.json") if path.parent.name != "corpus")
    if not found:
        raise DataError(f"{raw_dir}: no ingested datasets (run the ingest stage first)")
    return found


def run(params: ValidateParams, raw_dir: Path, out_dir: Path, metrics_path: Path) -> dict[str, Any]:
    """Validate every dataset; write reports; raise ValidationFailed when one fails and on_failure is fail.

    The metrics file keeps, per dataset, whether it passed and how many expectations failed.
    """
    reports: dict[str, Any] = {}
    failures: list[str] = []
    with atomic_output_dir(out_dir) as staging:
        for dataset_dir in dataset_dirs(raw_dir):
            dataset = dataset_dir.name
            manifest = read_json(dataset_dir / "manifest.json")
            views = build_views(manifest, load_splits(dataset_dir), params)
            outcomes = run_suites(dataset, views, params, staging / "data_docs" / dataset)
            report = summarize(dataset, manifest, outcomes, params)
            write_json(staging / f"{dataset}.json", report)
            reports[dataset] = report
            if not report["success"]:
                failures.append(failure_line(dataset, outcomes))
    write_json_atomic(
        metrics_path, {name: {k: r[k] for k in ("success", "evaluated", "failed")} for name, r in reports.items()}
    )
    if failures and params.on_failure == "fail":
        raise ValidationFailed(failures[0] + f"; see {out_dir}/")
    for line in failures:
        print(f"warning: {line} (validate.on_failure is warn)")
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--out", type=Path, default=Path("reports/validation"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/validate.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    started = time.perf_counter()
    reports = run(params.validate_, args.raw, args.out, args.metrics)
    for dataset, report in reports.items():
        state = "passed" if report["success"] else "FAILED"
        print(
            f"validate: {dataset}: {state} {report['evaluated'] - report['failed']}/{report['evaluated']} expectations"
        )
    print(f"validate: reports and Data Docs in {args.out}/ ({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    run_main(main)
