from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge import promote, registry
from lmforge.artifacts import PromotionReport
from lmforge.params import Params, deep_merge, params_to_dict, parse_params
from lmforge.promote import PromotePaths
from tests.conftest import REPO, SmokeRun, run_in


@pytest.fixture(scope="module")
def candidates(smoke_evaluated: SmokeRun, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real sentiment candidates: the smoke model, and one fine-tuned with another seed and more steps."""
    root = tmp_path_factory.mktemp("candidates")
    params = parse_params(deep_merge(params_to_dict(smoke_evaluated.params), {
        "finetune": {"seed": 7, "tasks": {"sentiment": {"training": {"max_steps": 20, "learning_rate": 0.003}}}},
    }))  # fmt: skip
    run_in("finetune@sentiment", params, smoke_evaluated.root, out=root / "model_b", checkpoints=root / "ck",
           metrics=root / "model_b.json")  # fmt: skip
    run_in("evaluate@sentiment", params, smoke_evaluated.root, model=root / "model_b", out=root / "b" / "candidate")
    # As the optimize stage leaves them: reports/optimize/<task>/candidate holds the candidate's scores.
    (root / "a").mkdir()
    (root / "a" / "candidate").symlink_to(smoke_evaluated.root / "reports/evaluate/sentiment")
    return {"a": root / "a", "b": root / "b"}


def gate(params: Params, run: SmokeRun, optimized: Path) -> PromotionReport:
    """promote@sentiment of the candidate in `optimized` (reports/optimize/<task>-like)."""
    return promote.run(promote.section(params, "sentiment"), PromotePaths(
        optimized, run.raw / "sentiment", run.validation / "sentiment.json", optimized / "report.json"))  # fmt: skip


def settings(smoke_run: SmokeRun, prefix: str, **promote_params) -> Params:
    return parse_params(deep_merge(params_to_dict(smoke_run.params), {"promote": {"model_prefix": prefix,
                                                                                  **promote_params}}))  # fmt: skip


def version_of(report: dict | PromotionReport) -> str:
    return str(report["version"] if isinstance(report, dict) else report.version)


def test_first_model_needs_the_floor_then_becomes_champion(smoke_evaluated: SmokeRun, candidates, tmp_path: Path):
    run = smoke_evaluated
    strict = settings(run, "floor", floors={"sentiment": 1.01})
    failed = gate(strict, run, candidates["a"])
    assert failed.decision == "fail" and failed.champion_after is None
    assert any("misses the floor 1.01" in reason for reason in failed.reasons)
    client = registry.client()
    assert str(registry.alias_version(client, "floor-sentiment", "challenger").version) == version_of(failed)

    passed = gate(settings(run, "floor", floors={"sentiment": 0.0}), run, candidates["a"])
    assert passed.decision == "pass" and version_of(passed) == version_of(failed)  # same evaluation, same version
    champion = registry.alias_version(client, "floor-sentiment", "champion")
    assert str(champion.version) == version_of(passed)
    assert champion.tags["gate.decision"] == "pass" and "floor" in champion.tags["gate.reasons"]
    assert champion.tags["dataset.test_sha256"] == json.loads((run.raw / "sentiment/manifest.json").read_text())[
        "test_sha256"]  # fmt: skip
    assert len(champion.tags["git_commit"]) >= 7
    again = gate(settings(run, "floor", floors={"sentiment": 0.0}), run, candidates["a"])
    assert again.decision == "unchanged"


def champion_by_hand(client, name: str, candidate: Path) -> str:
    """Register a candidate without gating it and make it champion, as a user would in the MLflow UI."""
    model = json.loads((candidate / "candidate" / "model.json").read_text())
    version = str(registry.register(client, name, model["model_uri"], model["run_id"], {}).version)
    client.set_registered_model_alias(name, "champion", version)
    return version


def test_candidate_is_compared_with_a_champion_set_by_hand(smoke_evaluated: SmokeRun, candidates):
    run = smoke_evaluated
    params = settings(run, "hand", floors={"sentiment": 0.0})
    first = gate(params, run, candidates["a"])
    client = registry.client()
    version_b = champion_by_hand(client, "hand-sentiment", candidates["b"])
    report = promote.gate_version(promote.section(params, "sentiment"), version_of(first), run.raw / "sentiment",
                                  run.validation / "sentiment.json")  # fmt: skip
    assert report.champion_before == version_b
    assert any("vs champion" in reason for reason in report.reasons)
    after = registry.alias_version(client, "hand-sentiment", "champion")
    assert (str(after.version) == version_of(first)) == (report.decision == "pass")


def test_rollback_returns_champion_to_the_one_before(smoke_evaluated: SmokeRun, candidates):
    run = smoke_evaluated
    params = settings(run, "roll", floors={"sentiment": 0.0})
    first = gate(params, run, candidates["a"])
    client = registry.client()
    version_b = champion_by_hand(client, "roll-sentiment", candidates["b"])
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "rollback", "--task", "sentiment", "--params",
                             str(write_params(params, run.root / "roll.yaml"))], cwd=REPO, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-800:]
    assert f"moved from version {version_b} back to version {version_of(first)}" in result.stdout
    assert str(registry.alias_version(client, "roll-sentiment", "champion").version) == version_of(first)
    again = subprocess.run([sys.executable, "-m", "lmforge.cli", "rollback", "--task", "sentiment", "--params",
                            str(run.root / "roll.yaml")], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 2 and "is the first champion; nothing to roll back to" in again.stderr


def write_params(params: Params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params_to_dict(params), allow_unicode=True, sort_keys=False))
    return path


def test_two_promotions_at_once_never_crown_a_failed_version(smoke_evaluated: SmokeRun, candidates, tmp_path: Path):
    run = smoke_evaluated
    params_file = write_params(settings(run, "race", floors={"sentiment": 0.0}), tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = {
        label: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stages.promote",
                "--params",
                str(params_file),
                "--task",
                "sentiment",
                "--optimized",
                str(candidates[label]),
                "--dataset",
                str(run.raw / "sentiment"),
                "--validation",
                str(run.validation / "sentiment.json"),
                "--report",
                str(tmp_path / f"{label}.json"),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label in ("a", "b")
    }
    for label, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{label}: {stderr[-800:]}"
    reports = {label: json.loads((tmp_path / f"{label}.json").read_text()) for label in processes}
    champion = registry.alias_version(registry.client(), "race-sentiment", "champion")
    assert champion is not None and champion.tags["gate.decision"] == "pass"
    # One of them went first (against no champion, the floor); the other was gated against it.
    firsts = [label for label, report in reports.items() if report["champion_before"] is None]
    assert len(firsts) == 1
    second = reports["b" if firsts == ["a"] else "a"]
    assert second["champion_before"] == version_of(reports[firsts[0]])
    expected = version_of(second) if second["decision"] == "pass" else version_of(reports[firsts[0]])
    assert str(champion.version) == expected
