"""promote: register the task's candidate in the MLflow registry and run the gate on it.

Only a candidate that passes every check takes `@champion` (the replaced champion becomes
`@previous`); one that fails gets `@challenger` and `@champion` stays where it was. The decision and
each reason go to the model version (tags and description), to reports/promotion/<task>.json, and
to an MLflow run. The check of the champion and the move of the alias happen under one lock, so two
promotions at once cannot leave `@champion` on a version that failed its gate.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from lmforge import registry, tracking
from lmforge.errors import LmforgeError, run_main
from lmforge.gate import decide
from lmforge.io import read_json, write_json_atomic
from lmforge.params import Params, load_params

PREFECT_ENV = "LMFORGE_PREFECT_FLOW_RUN_ID"


def lineage_tags(params: Params, task: str, candidate: Path, raw: Path) -> dict[str, str]:
    """Where the candidate came from: commit, dvc.lock hashes, dataset digest, Optuna trial, Prefect run."""
    spec = params.finetune.tasks[task]
    manifest = read_json(raw / spec.dataset / "manifest.json")
    best = read_json(candidate.parent / "best_params.json") if (candidate.parent / "best_params.json").is_file() else {}
    tags = {
        "git_commit": tracking.git_commit(),
        "task": task,
        "dataset": spec.dataset,
        "dataset.test_sha256": manifest["test_sha256"],
        "dataset.source_sha256": manifest["source"]["sha256"],
        **tracking.dvc_lineage(f"promote@{task}"),
        **tracking.dvc_lineage(f"finetune@{task}"),
    }
    if best.get("tuned"):
        tags.update({"optuna.study": best["study"], "optuna.trial": str(best["best_trial"])})
    if os.environ.get(PREFECT_ENV):
        tags["prefect.flow_run_id"] = os.environ[PREFECT_ENV]
    return tags


def log_test_dataset(raw: Path, dataset: str) -> str:
    """The frozen test split as an MLflow dataset input of this run; returns its digest."""
    test = pd.read_parquet(raw / dataset / "test.parquet")
    frame = test[["text"] + [c for c in ("label",) if c in test.columns]]
    data = mlflow.data.from_pandas(frame, name=f"{dataset}-test", source=str(raw / dataset / "test.parquet"))
    mlflow.log_input(data, context="test")
    return data.digest


def validation_passed(validation: Path, dataset: str, test_sha256: str) -> bool:
    report_path = validation / f"{dataset}.json"
    if not report_path.is_file():
        return False
    report = read_json(report_path)
    return bool(report["success"]) and report["test_sha256"] == test_sha256


def gate_version(params: Params, task: str, version: str, raw: Path, validation: Path) -> dict[str, Any]:
    """Run the gate on an already registered version; move the aliases; record the decision."""
    spec = params.finetune.tasks[task]
    name = registry.model_name(params.promote.model_prefix, task)
    client = registry.client()
    manifest = read_json(raw / spec.dataset / "manifest.json")
    smoke_text = str(pd.read_parquet(raw / spec.dataset / "test.parquet", columns=["text"])["text"].iloc[0])
    with registry.promotion_lock(name), tracking.stage_run("promote", {"task": task, **params.promote.model_dump()},
                                                            task=task, system_metrics=False) as run:  # fmt: skip
        mv = client.get_model_version(name, str(version))
        version = str(mv.version)
        candidate = registry.evidence_of(client, mv)
        champion_version = registry.alias_version(client, name, registry.CHAMPION)
        if champion_version is not None and str(champion_version.version) == version:
            # Re-running promote on the model that already serves changes nothing.
            return {
                "task": task,
                "registered_model": name,
                "version": version,
                "decision": "unchanged",
                "reasons": [f"version {version} already holds @champion"],
                "checks": {},
                "champion_before": version,
                "champion_after": registry.describe(champion_version),
                "mlflow_run_id": run.info.run_id,
            }
        champion = registry.evidence_of(client, champion_version) if champion_version is not None else None
        digest = log_test_dataset(raw, spec.dataset)
        decision = decide(
            candidate, champion, params.promote, params.promote.floors.get(task),
            validation_passed(validation, spec.dataset, manifest["test_sha256"]), manifest["test_sha256"],
            registry.smoke_load(name, version, smoke_text),
        )  # fmt: skip
        verdict = "pass" if decision.passed else "fail"
        if decision.passed:
            registry.crown(client, name, version)
        else:
            client.set_registered_model_alias(name, registry.CHALLENGER, version)
        reasons = "; ".join(decision.reasons)
        client.set_model_version_tag(name, version, "gate.decision", verdict)
        client.set_model_version_tag(name, version, "gate.reasons", reasons[:4900])
        client.set_model_version_tag(name, version, "dataset.test_digest", digest)
        client.update_model_version(name, version, description=f"Gate {verdict.upper()} "
                                    f"(vs champion {champion_version.version if champion_version else 'none'}):\n- "
                                    + "\n- ".join(decision.reasons))  # fmt: skip
        report = {
            "task": task, "registered_model": name, "version": version, "decision": verdict,
            "reasons": decision.reasons, "checks": decision.checks,
            "champion_before": str(champion_version.version) if champion_version else None,
            "champion_after": registry.describe(registry.alias_version(client, name, registry.CHAMPION)),
            "improvement": decision.improvement, "improvement_lower_bound": decision.improvement_lower_bound,
            "candidate_primary": candidate.primary, "primary_metric": candidate.metrics["primary_metric"],
            "champion_primary": champion.primary if champion else None, "mlflow_run_id": run.info.run_id,
        }  # fmt: skip
        mlflow.set_tags({"gate.decision": verdict, "registered_model": name, "model_version": version})
        mlflow.log_dict(report, "promotion.json")
    return report


def run(params: Params, task: str, candidate: Path, raw: Path, validation: Path) -> dict[str, Any]:
    """Register reports/optimize/<task>/candidate's model and gate it."""
    if task not in params.finetune.tasks:
        raise LmforgeError(f"finetune.tasks: no task named {task!r} (have: {', '.join(params.finetune.tasks)})")
    model = read_json(candidate / "model.json")
    name = registry.model_name(params.promote.model_prefix, task)
    client = registry.client()
    mv = registry.register(
        client, name, model["model_uri"], model["run_id"], lineage_tags(params, task, candidate, raw)
    )
    return gate_version(params, task, str(mv.version), raw, validation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--task", required=True)
    parser.add_argument("--candidate", type=Path, help="default: reports/optimize/<task>/candidate")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--validation", type=Path, default=Path("reports/validation"))
    parser.add_argument("--out", type=Path, help="default: reports/promotion/<task>.json")
    args = parser.parse_args()
    params = load_params(args.params)
    report = run(params, args.task, args.candidate or Path("reports/optimize") / args.task / "candidate", args.raw,
                 args.validation)  # fmt: skip
    write_json_atomic(args.out or Path("reports/promotion") / f"{args.task}.json", report)
    champion = report["champion_after"]
    print(f"promote: {report['registered_model']} version {report['version']}: gate {report['decision'].upper()}; "
          f"@champion is version {champion['version'] if isinstance(champion, dict) else champion}")  # fmt: skip
    for reason in report["reasons"]:
        print(f"  {reason}")


if __name__ == "__main__":
    run_main(main)
