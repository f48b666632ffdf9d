from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors import safe_open

from lmforge.errors import LmforgeError
from lmforge.params import params_to_dict
from tests.conftest import SmokeRun, run_in, run_stage


def tensor_names(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


@pytest.mark.parametrize(("task", "kind"), [("sentiment", "classification"), ("ner", "token_classification"),
                                            ("continuation", "generation")])  # fmt: skip
def test_each_task_writes_a_safetensors_model_that_describes_itself(smoke_models: SmokeRun, task: str, kind: str):
    out = smoke_models.root / "models/finetuned" / task
    meta = json.loads((out / "lmforge_task.json").read_text())
    assert meta["kind"] == kind and meta["method"] == "full"
    assert meta["test_sha256"] == json.loads((smoke_models.raw / meta["dataset"] / "manifest.json").read_text())[
        "test_sha256"]  # fmt: skip
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert [entry["step"] for entry in json.loads((out / "history.json").read_text())] == [5, 10]
    assert meta["word_start_types"] == (kind == "token_classification")  # a BERT base has two token types


def test_the_word_starts_trained_on_are_those_inference_marks(smoke_run: SmokeRun):
    """finetune takes them from the labels, inference from the tokenizer's word ids: they must agree."""
    import pandas as pd
    from transformers import AutoTokenizer

    from lmforge.task_training import add_word_starts, read_rows
    from lmforge.tokenization import word_starts

    rows = read_rows(smoke_run.processed / "datasets/people_daily/train.parquet", limit=50)
    add_word_starts(rows)
    tokenizer = AutoTokenizer.from_pretrained(str(smoke_run.processed / "tokenizer"))
    sentences = pd.read_parquet(smoke_run.raw / "people_daily/train.parquet")["tokens"].head(50)
    encoded = tokenizer([list(words) for words in sentences], is_split_into_words=True, truncation=True,
                        max_length=smoke_run.params.preprocess.max_length)  # fmt: skip
    assert any(0 in row["token_type_ids"][1:-1] for row in rows)  # some words are several pieces
    assert [row["token_type_ids"] for row in rows] == [word_starts(encoded.word_ids(i)) for i in range(50)]


def test_prompt_loss_trains_on_the_prompts_own_tokens_too(smoke_run: SmokeRun):
    from transformers import AutoTokenizer

    from lmforge.task_training import generation_rows

    tokenizer = AutoTokenizer.from_pretrained(str(smoke_run.processed / "tokenizer"))
    source, special = smoke_run.raw / "sentiment/train.parquet", set(tokenizer.all_special_ids)
    plain, both = (generation_rows(source, tokenizer, 12, 64, limit=20, prompt_loss=flag) for flag in (False, True))
    for a, b in zip(plain, both, strict=True):
        assert a["input_ids"] == b["input_ids"]
        sep = a["input_ids"].index(tokenizer.sep_token_id)  # [CLS] prompt [SEP] continuation [SEP]
        assert a["labels"][: sep + 1] == [-100] * (sep + 1) and b["labels"][sep + 1 :] == a["labels"][sep + 1 :]
        assert b["labels"][: sep + 1] == [t if t not in special else -100 for t in a["input_ids"][: sep + 1]]
        assert any(label != -100 for label in b["labels"][1:sep])


def smoke_task(smoke_models: SmokeRun, task: str = "sentiment", **changes) -> object:
    data = params_to_dict(smoke_models.params)
    data["finetune"]["tasks"][task].update(changes)
    from lmforge.params import parse_params

    return parse_params(data)


def finetune(smoke_models: SmokeRun, params: object, task: str, out: Path, checkpoints: Path,
             base: Path | None = None) -> object:  # fmt: skip
    """finetune@task on the smoke run's data, writing to out and checkpoints, from `base` (else the folder
    of the pretrain.models entry the params name, as dvc.yaml would give it)."""
    base = base or smoke_models.root / "models/pretrained" / params.finetune.tasks[task].base  # type: ignore[attr-defined]
    return run_in(f"finetune@{task}", params, smoke_models.root, out=out, checkpoints=checkpoints,  # type: ignore[arg-type]
                  report=out.parent / f"{out.name}.json", metrics=out.parent / f"{out.name}.figures.json",
                  base=base)  # fmt: skip


def test_lora_trains_adapters_and_merges_them_into_a_plain_model(smoke_models: SmokeRun, tmp_path: Path):
    params = smoke_task(smoke_models, method="lora")
    report = finetune(smoke_models, params, "sentiment", tmp_path / "lora", tmp_path / "ck")
    assert report.steps == 10
    names = tensor_names(tmp_path / "lora")
    assert not any("lora_" in name for name in names)  # merged: no peft needed to serve it
    assert names == tensor_names(smoke_models.root / "models/finetuned/sentiment")


def test_the_tasks_dropout_replaces_the_bases_while_fine_tuning(smoke_models: SmokeRun, tmp_path: Path):
    """dropout null keeps the base's probabilities; a number sets every one of them, and is recorded."""
    config_of = lambda folder: json.loads((folder / "config.json").read_text())  # noqa: E731
    base = config_of(smoke_models.root / "models/pretrained/encoder")
    default = smoke_models.root / "models/finetuned/sentiment"
    assert config_of(default)["hidden_dropout_prob"] == base["hidden_dropout_prob"] > 0
    assert json.loads((default / "lmforge_task.json").read_text())["dropout"] is None
    finetune(smoke_models, smoke_task(smoke_models, dropout=0.25), "sentiment", tmp_path / "d", tmp_path / "ck")
    config = config_of(tmp_path / "d")
    assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == 0.25
    assert json.loads((tmp_path / "d/lmforge_task.json").read_text())["dropout"] == 0.25


def hf_model(smoke_models: SmokeRun, folder: Path) -> Path:
    """A Hugging Face model folder as another library saves one: config, safetensors weights, tokenizer."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    encoder = smoke_models.root / "models/pretrained/encoder"
    AutoModelForMaskedLM.from_pretrained(str(encoder)).save_pretrained(str(folder), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(encoder)).save_pretrained(str(folder))
    return folder


def pretrain_hf(smoke_models: SmokeRun, tmp_path: Path, name: str, model: dict, task: str) -> tuple[Any, Path, Any]:
    """pretrain@name of the Hugging Face model entry `model` (laid out as pretrain@encoder), the base of `task`;
    the params, the model's folder and the stage's report."""
    from lmforge.params import parse_params

    data = params_to_dict(smoke_models.params)
    data["pretrain"]["models"][name] = model
    data["finetune"]["tasks"][task]["base"] = name
    params, base = parse_params(data), tmp_path / "pretrained" / name
    report = run_in(f"pretrain@{name}", params, smoke_models.root, like="pretrain@encoder", out=base,
                    checkpoints=tmp_path / "pck", report=tmp_path / f"{name}.json",
                    metrics=tmp_path / f"{name}.figures.json")  # fmt: skip
    return params, base, report


def gpt2_style_model(folder: Path, corpus: Path) -> Path:
    """A GPT-2-style decoder folder: a character tokenizer with an end-of-text token and no [CLS], [SEP] or pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    chars = sorted({char for char in corpus.read_text(encoding="utf-8") if not char.isspace()})
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{char: i + 2 for i, char in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_hugging_face_model_is_pretrained_further_on_the_corpus_with_its_own_tokenizer(
    kind: str, smoke_models: SmokeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    source = tmp_path / "models/external/theirs"
    if kind == "bert":
        hf_model(smoke_models, source)
    else:
        gpt2_style_model(source, smoke_models.raw / "corpus/train.txt")
    monkeypatch.chdir(tmp_path)
    model = {"architecture": "hf", "source": "models/external/theirs", "continue_pretraining": True,
             "block_size": 32, "max_steps": 12, "batch_size": 8, "learning_rate": 3e-3}  # fmt: skip
    params, base, report = pretrain_hf(smoke_models, tmp_path, "theirs", model, "continuation")
    assert report.steps == 12 and report.val_loss is not None
    record = json.loads((base / "lmforge_source.json").read_text())["continued"]
    assert record["objective"] == ("mlm" if kind == "bert" else "causal") and record["steps"] == 12
    assert record["val_loss_after"] < record["val_loss_before"]  # it learned the corpus
    assert not (base / "lmforge_params.json").exists()  # its tokenizer is its own, not the pipeline's
    assert (base / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    auto = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    before, after = (auto.from_pretrained(str(folder), use_safetensors=True) for folder in (source, base))
    assert any(not a.equal(b) for a, b in zip(before.parameters(), after.parameters(), strict=True))
    if kind == "gpt2":  # no pad token: every position of every block is real text, attended to and learned
        blocks = (tmp_path / "pck/blocks/train.bin").read_bytes()
        assert blocks and len(blocks) % (32 * 2) == 0  # uint16 ids, whole blocks only
        finetune(smoke_models, params, "continuation", tmp_path / "out", tmp_path / "ck", base=base)
        assert json.loads((tmp_path / "out/lmforge_task.json").read_text())["base_resolved"] == str(base)


def test_a_hugging_face_model_is_copied_in_and_fine_tuned_with_its_own_tokenizer(
    smoke_models: SmokeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    hf_model(smoke_models, tmp_path / "models/external/my-bert")
    monkeypatch.chdir(tmp_path)  # the repository root: a local base lives inside it, where DVC sees it
    model = {"architecture": "hf", "source": "models/external/my-bert"}
    params, base, report = pretrain_hf(smoke_models, tmp_path, "mine", model, "sentiment")
    assert report.steps == 0 and report.val_loss is None and report.n_parameters > 0
    copied = {path.name for path in base.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "lmforge_source.json"} <= copied
    assert "lmforge_params.json" not in copied  # not pretrained here: its tokenizer is its own
    finetune(smoke_models, params, "sentiment", tmp_path / "out", tmp_path / "ck", base=base)
    assert json.loads((tmp_path / "out/lmforge_task.json").read_text())["base_resolved"] == str(base)
    assert (tmp_path / "ck/tokenized/train.parquet").is_file()  # the raw splits, tokenized with the base's tokenizer


def test_a_hub_model_offline_is_a_transient_failure_in_one_line(smoke_models: SmokeRun, tmp_path: Path):
    data = params_to_dict(smoke_models.params)
    data["pretrain"]["models"]["hub"] = {"architecture": "hf", "source": "bert-base-chinese", "revision": "8d2a91f"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    result = run_stage("pretrain", "--params", tmp_path / "params.yaml", "--model", "hub",
                       "--blocks", smoke_models.processed / "pretrain", "--corpus", smoke_models.raw / "corpus",
                       "--tokenizer", smoke_models.processed / "tokenizer",
                       "--out", tmp_path / "out", "--checkpoints", tmp_path / "ck", "--report", tmp_path / "r.json",
                       "--metrics", tmp_path / "m.json",
                       env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    assert result.returncode == 75, result.stderr[-1500:]
    (line,) = result.stderr.strip().splitlines()
    assert "pretrain.models.hub.source: cannot download 'bert-base-chinese'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("trouble", ["unpinned hub id", "remote code"])
def test_a_base_that_could_change_or_run_its_own_code_is_refused_in_one_line(trouble: str, smoke_models: SmokeRun,
                                                                            tmp_path: Path):  # fmt: skip
    data = params_to_dict(smoke_models.params)
    if trouble == "unpinned hub id":  # a branch moves: the same params would copy other weights next time
        data["pretrain"]["models"]["hub"] = {"architecture": "hf", "source": "bert-base-chinese"}
        expected = "pretrain.models.hub.revision: pin the hub revision of 'bert-base-chinese'"
    else:  # config.json asks for the model's own Python (what trust_remote_code would run)
        folder = hf_model(smoke_models, tmp_path / "models/external/custom")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling.MyModel"}}))
        data["pretrain"]["models"]["hub"] = {"architecture": "hf", "source": "models/external/custom"}
        expected = "asks for code of its own (auto_map in config.json)"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    result = run_stage("pretrain", "--params", tmp_path / "params.yaml", "--model", "hub",
                       "--blocks", smoke_models.processed / "pretrain", "--corpus", smoke_models.raw / "corpus",
                       "--tokenizer", smoke_models.processed / "tokenizer",
                       "--out", tmp_path / "out", "--checkpoints", tmp_path / "ck", "--report", tmp_path / "r.json",
                       "--metrics", tmp_path / "m.json", cwd=tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    assert result.returncode == 2, result.stderr[-1500:]
    (line,) = result.stderr.strip().splitlines()
    assert expected in line


def test_a_checkpoint_of_another_base_is_never_resumed(smoke_models: SmokeRun, tmp_path: Path):
    """New data re-trains the base; the fine-tune's checkpoints of the old base must not be resumed."""
    import torch
    from safetensors.torch import load_file, save_file

    base = tmp_path / "encoder"
    shutil.copytree(smoke_models.root / "models/pretrained/encoder", base)
    params = smoke_task(smoke_models)
    run = lambda out: finetune(smoke_models, params, "sentiment", tmp_path / out, tmp_path / "ck", base)  # noqa: E731
    run("first")
    again = run("again")  # same base, same data: the finished checkpoint is reused, nothing retrains
    assert again.steps == 10
    assert (tmp_path / "again/model.safetensors").read_bytes() == (tmp_path / "first/model.safetensors").read_bytes()

    weights = base / "model.safetensors"
    save_file({name: tensor + 0.01 * torch.randn_like(tensor) for name, tensor in load_file(weights).items()},
              str(weights), metadata={"format": "pt"})  # fmt: skip
    run("new-base")
    assert (tmp_path / "new-base/model.safetensors").read_bytes() != (tmp_path / "first/model.safetensors").read_bytes()


def test_generation_from_an_encoder_fails_naming_the_key(smoke_models: SmokeRun, tmp_path: Path):
    data = params_to_dict(smoke_models.params)
    data["finetune"]["tasks"]["continuation"]["base"] = "encoder"
    from lmforge.params import parse_params

    with pytest.raises(LmforgeError, match=r"finetune.tasks.continuation.base: generation needs a decoder"):
        finetune(smoke_models, parse_params(data), "continuation", tmp_path / "out", tmp_path / "ck")


def cli(smoke_models: SmokeRun, tmp_path: Path, task: str, base: str | None = None, env: dict | None = None,
        **changes: object):  # fmt: skip
    data = params_to_dict(smoke_models.params)
    if base is not None:
        data["finetune"]["tasks"]["sentiment"]["base"] = base
    data["finetune"]["tasks"]["sentiment"].update(changes)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    dataset = smoke_models.params.finetune.tasks["sentiment"].dataset
    return run_stage("finetune", "--params", tmp_path / "params.yaml", "--task", task,
                     "--dataset", smoke_models.raw / dataset,
                     "--tokenized", smoke_models.processed / "datasets" / dataset,
                     "--base", smoke_models.root / "models/pretrained/encoder",
                     "--out", tmp_path / "out", "--checkpoints", tmp_path / "ck", "--report", tmp_path / "m.json",
                     "--metrics", tmp_path / "figures.json",
                     env=env)  # fmt: skip


@pytest.mark.parametrize(
    ("task", "base", "expected"),
    [
        ("nope", None, "finetune.tasks: no task named 'nope' (have: sentiment, ner, continuation)"),
        (
            "sentiment",
            "pretrained:encoder",
            "finetune.tasks.sentiment.base: 'pretrained:encoder': name the pretrain.models entry alone (encoder)",
        ),
        (
            "sentiment",
            "bert-base-chinese",
            "finetune.tasks.sentiment.base: 'bert-base-chinese' is not in pretrain.models; to start from a Hugging "
            "Face model declare it there",
        ),
    ],
)
def test_bad_task_or_base_gives_one_line(smoke_models: SmokeRun, tmp_path: Path, task: str, base: str | None,
                                         expected: str):  # fmt: skip
    result = cli(smoke_models, tmp_path, task, base, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr[-1500:]
    assert not (tmp_path / "out").exists()


def test_lora_on_two_devices_trains_and_writes_one_merged_model(smoke_models: SmokeRun, tmp_path: Path):
    """finetune under torchrun: the frozen base and the adapters in DDP, rank 0 alone merging and writing."""
    training = {**params_to_dict(smoke_models.params)["finetune"]["tasks"]["sentiment"]["training"], "devices": 2}
    result = cli(smoke_models, tmp_path, "sentiment", method="lora", training=training)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("finetune: val loss") == 1
    names = tensor_names(tmp_path / "out")
    assert not any("lora_" in name for name in names)
    assert names == tensor_names(smoke_models.root / "models/finetuned/sentiment")
    assert json.loads((tmp_path / "m.json").read_text())["steps"] == 10


def test_class_weights_only_where_classes_are_skewed():
    from lmforge.schema import FinetuneTask
    from lmforge.task_training import class_weights

    task = FinetuneTask(dataset="d", kind="classification", base="encoder")
    skewed = [{"label": 0}] * 90 + [{"label": 1}] * 10
    weights = class_weights(task, ["big", "small"], skewed)
    assert weights is not None and weights.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    assert class_weights(task, ["a", "b"], [{"label": 0}] * 60 + [{"label": 1}] * 40) is None  # 1.5x: not skewed
    assert class_weights(task.model_copy(update={"class_weights": "none"}), ["big", "small"], skewed) is None
    balanced = class_weights(task.model_copy(update={"class_weights": "balanced"}), ["a", "b"],
                             [{"label": 0}] * 50 + [{"label": 1}] * 50)  # fmt: skip
    assert balanced is not None and balanced.tolist() == [1.0, 1.0]


def classifier_width(model_folder: Path) -> int:
    """How many features the saved model's classifier reads."""
    with safe_open(str(model_folder / "model.safetensors"), framework="pt") as handle:
        return handle.get_slice("classifier.weight").get_shape()[1]


def test_a_classifier_on_an_mlm_encoder_reads_the_mean_and_max_of_its_states(smoke_models: SmokeRun, tmp_path: Path):
    """pooling auto: mean_max for lmforge's masked-LM encoder ([CLS] was never trained); mean or cls when asked."""
    config_of = lambda folder: json.loads((folder / "config.json").read_text())  # noqa: E731
    default = smoke_models.root / "models/finetuned/sentiment"
    hidden = config_of(default)["hidden_size"]
    assert config_of(default)["model_type"] == "lmforge_bert_mean" and config_of(default)["pool_max"] is True
    assert classifier_width(default) == 2 * hidden
    assert json.loads((default / "lmforge_task.json").read_text())["pooling"] == "mean_max"
    assert not any(name.startswith("bert.pooler") for name in tensor_names(default))
    finetune(smoke_models, smoke_task(smoke_models, pooling="mean"), "sentiment", tmp_path / "mean", tmp_path / "ck")
    assert config_of(tmp_path / "mean")["pool_max"] is False and classifier_width(tmp_path / "mean") == hidden
    assert json.loads((tmp_path / "mean/lmforge_task.json").read_text())["pooling"] == "mean"
    finetune(smoke_models, smoke_task(smoke_models, pooling="cls"), "sentiment", tmp_path / "cls", tmp_path / "ck")
    assert config_of(tmp_path / "cls")["model_type"] == "bert"
    assert any(name.startswith("bert.pooler") for name in tensor_names(tmp_path / "cls"))


def test_a_tagger_on_an_lmforge_encoder_reads_each_words_pieces(smoke_models: SmokeRun, tmp_path: Path):
    """pooling auto on token classification: a word's first piece and the mean of its pieces; cls when asked."""
    config_of = lambda folder: json.loads((folder / "config.json").read_text())  # noqa: E731
    default = smoke_models.root / "models/finetuned/ner"
    hidden = config_of(default)["hidden_size"]
    assert config_of(default)["model_type"] == "lmforge_bert_words"
    assert json.loads((default / "lmforge_task.json").read_text())["pooling"] == "mean"
    assert classifier_width(default) == 2 * hidden
    finetune(smoke_models, smoke_task(smoke_models, "ner", pooling="cls"), "ner", tmp_path / "cls", tmp_path / "ck")
    assert config_of(tmp_path / "cls")["model_type"] == "bert"
    assert json.loads((tmp_path / "cls/lmforge_task.json").read_text())["pooling"] == "cls"


def test_mean_pooling_on_a_decoder_fails_naming_the_key(smoke_models: SmokeRun, tmp_path: Path):
    params = smoke_task(smoke_models, pooling="mean", base="decoder")
    with pytest.raises(LmforgeError, match=r"finetune.tasks.sentiment.pooling: mean needs a bert base"):
        finetune(smoke_models, params, "sentiment", tmp_path / "out", tmp_path / "ck")


def test_mean_max_pooling_on_a_tagger_fails_naming_the_key(smoke_models: SmokeRun, tmp_path: Path):
    params = smoke_task(smoke_models, "ner", pooling="mean_max")
    with pytest.raises(LmforgeError, match=r"finetune.tasks.ner.pooling: mean_max pools a whole text"):
        finetune(smoke_models, params, "ner", tmp_path / "out", tmp_path / "ck")
