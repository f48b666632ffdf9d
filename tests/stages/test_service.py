"""The service profile's applications: intent recognition on real customer-service utterances (chatbot-nlu) and
reply generation on chatterbot-corpus's conversations, ingested, validated, trained, evaluated and gated like the
bundled tasks, at smoke sizes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lmforge.artifacts import EvaluateReport, Manifest, PromoteReport, ValidateReport
from lmforge.data.sources import chatbot_nlu_intents_file
from lmforge.params import PROFILES_DIR, deep_merge, params_to_dict, parse_params, profile_params
from lmforge.schema import Params
from tests.conftest import run_in


def service_smoke() -> dict:
    """The smoke profile with the service profile's dataset and task, trained as briefly as smoke's tasks."""
    overlay = yaml.safe_load((PROFILES_DIR / "service.yaml").read_text())
    smoke_training = params_to_dict(profile_params("smoke"))["finetune"]["tasks"]["sentiment"]["training"]
    overlay["finetune"]["tasks"]["intent"]["training"] = smoke_training
    overlay["finetune"]["tasks"]["reply"]["training"] = params_to_dict(profile_params("smoke"))["finetune"]["tasks"][
        "continuation"
    ]["training"]
    overlay["promote"] = {"model_prefix": f"service-{uuid.uuid4().hex[:8]}"}
    return deep_merge(params_to_dict(profile_params("smoke")), overlay)


def promote(params: Params, root: Path, task: str, dataset: str, like: str, scores: Path) -> PromoteReport:
    """promote@task (a task this repository's dvc.yaml does not list: laid out as `like`'s) with the evaluated
    model in `scores` as its candidate."""
    optimized = root / f"optimized-{task}"
    optimized.mkdir()
    (optimized / "candidate").symlink_to(scores)
    run_in(f"promote@{task}", params, root, like=f"promote@{like}", optimized=optimized,
           dataset=root / "data/raw" / dataset, validation=root / f"reports/validation/{dataset}.json",
           report=root / f"promoted-{task}.json", metrics=root / f"promoted-{task}.figures.json")  # fmt: skip
    return PromoteReport.read(root / f"promoted-{task}.json")


def test_the_service_profile_is_the_default_plus_intents_and_replies():
    default, service = params_to_dict(profile_params("default")), params_to_dict(profile_params("service"))
    assert set(service["finetune"]["tasks"]) == set(default["finetune"]["tasks"]) | {"intent", "reply"}
    assert service["ingest"]["datasets"]["intents"]["source"]["kind"] == "chatbot_nlu_intents"
    assert service["ingest"]["datasets"]["replies"]["source"]["kind"] == "chatterbot_corpus"
    assert service["pretrain"] == default["pretrain"]


@pytest.fixture(scope="module")
def service_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Path]:
    """ingest -> validate -> preprocess of the service profile at smoke sizes."""
    params, root = parse_params(service_smoke()), tmp_path_factory.mktemp("service")
    for stage in ("ingest", "validate", "preprocess"):
        run_in(stage, params, root)
    return params, root


def test_intents_are_ingested_validated_trained_evaluated_and_gated(service_data: tuple[Params, Path]):
    params, tmp_path = service_data
    run_in("pretrain@encoder", params, tmp_path)
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

    decided = promote(params, tmp_path, "intent", "intents", like="sentiment", scores=scores)
    assert decided.baseline_version is not None and decided.champion_after is not None
    assert decided.champion_after.version in {decided.baseline_version, decided.version}


def test_replies_are_ingested_validated_trained_on_the_reply_alone_evaluated_and_gated(
    service_data: tuple[Params, Path],
):
    from transformers import AutoTokenizer

    from lmforge.task_training import generation_rows

    params, tmp_path = service_data
    raw = tmp_path / "data/raw/replies"
    manifest = Manifest.of(raw)
    assert manifest.kind == "instruction" and manifest.rows["source"] == 552
    assert manifest.rows["kept"] == 447  # one reply per message: the first
    train = pd.read_parquet(raw / "train.parquet")
    assert list(train.columns) == ["text", "response"]
    assert ValidateReport.read(tmp_path / "reports/validate.json").datasets["replies"].success

    # The loss covers the reply: every labelled token lies after the message's [SEP].
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "data/processed/tokenizer"))
    rows = generation_rows(raw / "train.parquet", tokenizer, 12, 64, limit=50)
    assert len(rows) == 50
    for row in rows:
        sep = row["input_ids"].index(tokenizer.sep_token_id)
        assert set(row["labels"][: sep + 1]) == {-100} and any(label != -100 for label in row["labels"][sep + 1 :])

    run_in("pretrain@decoder", params, tmp_path)
    model, scores = tmp_path / "models/finetuned/reply", tmp_path / "evaluated-reply"
    run_in("finetune@reply", params, tmp_path, like="finetune@continuation", dataset=raw, out=model,
           tokenized=tmp_path / "data/processed/datasets/replies", checkpoints=tmp_path / "checkpoints/reply",
           report=tmp_path / "finetuned-reply.json", metrics=tmp_path / "finetuned-reply.figures.json")  # fmt: skip
    run_in("evaluate@reply", params, tmp_path, like="evaluate@continuation", model=model, dataset=raw, out=scores,
           metrics=tmp_path / "evaluated-reply.figures.json")  # fmt: skip
    report = EvaluateReport.read(scores / "metrics.json")
    assert report.primary_metric == "perplexity" and report.baseline.name.startswith("ngram")
    test = pd.read_parquet(raw / "test.parquet")
    assert report.test_examples == min(params.evaluate.max_test_samples or 10**9, len(test))
    samples = json.loads((scores / "samples.json").read_text(encoding="utf-8"))
    assert samples and {sample["prompt"] for sample in samples} <= set(test["text"])  # the messages, whole

    decided = promote(params, tmp_path, "reply", "replies", like="continuation", scores=scores)
    assert decided.champion_after is not None
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
