"""The service profile's intent recognition: real customer-service utterances (chatbot-nlu) ingested, validated,
trained, evaluated and gated like the bundled tasks, at smoke sizes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from lmforge.artifacts import EvaluateReport, Manifest, PromoteReport, ValidateReport
from lmforge.data.sources import chatbot_nlu_intents_file
from lmforge.params import PROFILES_DIR, deep_merge, params_to_dict, parse_params, profile_params
from tests.conftest import run_in


def service_smoke() -> dict:
    """The smoke profile with the service profile's dataset and task, trained as briefly as smoke's tasks."""
    overlay = yaml.safe_load((PROFILES_DIR / "service.yaml").read_text())
    smoke_training = params_to_dict(profile_params("smoke"))["finetune"]["tasks"]["sentiment"]["training"]
    overlay["finetune"]["tasks"]["intent"]["training"] = smoke_training
    overlay["promote"] = {"model_prefix": f"service-{uuid.uuid4().hex[:8]}"}
    return deep_merge(params_to_dict(profile_params("smoke")), overlay)


def test_the_service_profile_is_the_default_plus_intent_recognition():
    default, service = params_to_dict(profile_params("default")), params_to_dict(profile_params("service"))
    assert set(service["finetune"]["tasks"]) == set(default["finetune"]["tasks"]) | {"intent"}
    assert service["ingest"]["datasets"]["intents"]["source"]["kind"] == "chatbot_nlu_intents"
    assert service["pretrain"] == default["pretrain"]


def test_intents_are_ingested_validated_trained_evaluated_and_gated(tmp_path: Path):
    params = parse_params(service_smoke())
    for stage in ("ingest", "validate", "preprocess", "pretrain@encoder"):
        run_in(stage, params, tmp_path)
    # This repository's dvc.yaml lists the default tasks; a params.yaml of the service profile lists intent too.
    raw, model, scores = tmp_path / "data/raw/intents", tmp_path / "models/finetuned/intent", tmp_path / "evaluated"
    run_in("finetune@intent", params, tmp_path, like="finetune@sentiment", dataset=raw, out=model,
           tokenized=tmp_path / "data/processed/datasets/intents", checkpoints=tmp_path / "checkpoints/intent",
           report=tmp_path / "finetuned.json", metrics=tmp_path / "finetuned.figures.json")  # fmt: skip
    run_in("evaluate@intent", params, tmp_path, like="evaluate@sentiment", model=model, dataset=raw, out=scores,
           metrics=tmp_path / "evaluated.figures.json")  # fmt: skip

    intents = json.loads(chatbot_nlu_intents_file().read_text(encoding="utf-8"))
    manifest = Manifest.of(tmp_path / "data/raw/intents")
    assert len(intents) == 64 and sum(map(len, intents.values())) == 1904
    at_least_5 = {intent for intent, texts in intents.items() if len(set(texts)) >= 5}  # source.min_utterances
    # 65 utterances sit under two intents (a combined one, e.g. '别人还+别人用', repeats '别人用''s): ingest keeps
    # one copy of a text, so an intent whose every utterance is also a combined one's may go.
    assert set(manifest.label_set()) <= at_least_5 and len(at_least_5) == 57 and len(manifest.label_set()) >= 55
    assert manifest.rows["source"] == sum(len(intents[intent]) for intent in at_least_5)  # 1,886 utterances
    assert manifest.rows["kept"] == manifest.rows["train"] + manifest.rows["val"] + manifest.rows["test"] > 1700
    assert ValidateReport.read(tmp_path / "reports/validate.json").datasets["intents"].success

    report = EvaluateReport.read(scores / "metrics.json")
    assert report.primary_metric == "macro_f1"
    assert report.test_examples == min(params.evaluate.max_test_samples or 10**9, manifest.rows["test"])
    assert report.baseline.name == "tfidf_char12_logreg"

    optimized = tmp_path / "optimized"
    optimized.mkdir()
    (optimized / "candidate").symlink_to(scores)
    run_in("promote@intent", params, tmp_path, like="promote@sentiment", optimized=optimized, dataset=raw,
           validation=tmp_path / "reports/validation/intents.json", report=tmp_path / "promoted.json",
           metrics=tmp_path / "promoted.figures.json")  # fmt: skip
    decided = PromoteReport.read(tmp_path / "promoted.json")
    assert decided.baseline_version is not None and decided.champion_after is not None
    assert decided.champion_after.version in {decided.baseline_version, decided.version}


def test_without_chatbot_nlu_the_dataset_names_the_install(monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    from lmforge.errors import DataError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "chatbot_nlu" else real(name, *a))
    with pytest.raises(
        DataError, match=r"ships in the `chatbot-nlu==1.0.3` package: pip install chatbot-nlu==1.0.3 --no-deps"
    ):
        chatbot_nlu_intents_file()
