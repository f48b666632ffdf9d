"""`lmforge predict`: score a file with a task's registered model, exactly as it serves.

The model is `models:/<prefix>-<task>@champion` (or a version), fetched and loaded through the same
checks as the gate (registry.load_pyfunc: lmforge's own serving code, safetensors, nothing unpickled),
and called the way `mlflow models serve` calls it, so a file scored here and the same rows posted to
/invocations get the same answers.

Input: one text per line (.txt), a JSON object per line with "text" (.jsonl; "words", a list, gives a
tagger the words of a segmented sentence), or a CSV file with a "text" column. It is read and scored
a batch at a time, so a file of any size takes the memory of one batch. The output (.jsonl or .csv) is
written beside its final name and renamed over it at the end: a bad row (one line naming the file and
line, exit 2) or a crash leaves no output, or the previous one whole.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pandas as pd

from lmforge import registry
from lmforge.data.sources import join_words, jsonl_records, read_csv, text_lines
from lmforge.errors import DataError, LmforgeError
from lmforge.io import remove, writing

INPUT_FORMATS = (".txt", ".jsonl", ".csv")
OUTPUT_FORMATS = (".jsonl", ".csv")


@dataclass(frozen=True)
class Row:
    """One input: where it is (file:line, for errors) and what the model is asked."""

    where: str
    text: str
    words: list[str] | None = None


def check_formats(input_path: Path, output_path: Path) -> None:
    """Both suffixes known before a model is fetched: a typo costs nothing."""
    if input_path.suffix.lower() not in INPUT_FORMATS:
        raise DataError(f"{input_path}: cannot read {input_path.suffix or 'a file without a suffix'!r}; "
                        f"give {', '.join(INPUT_FORMATS)}")  # fmt: skip
    if output_path.suffix.lower() not in OUTPUT_FORMATS:
        raise DataError(f"{output_path}: cannot write {output_path.suffix or 'a file without a suffix'!r}; "
                        f"give {', '.join(OUTPUT_FORMATS)}")  # fmt: skip
    if not input_path.is_file():
        raise DataError(f"{input_path}: is a directory, expected a file" if input_path.is_dir()
                        else f"{input_path}: file not found")  # fmt: skip
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise DataError(f"{output_path}: is the input too; write the answers to another file")
    try:
        open(input_path, "rb").close()
    except OSError as error:
        raise DataError(f"{input_path}: cannot read: {error.strerror or error}") from None


def read_rows(path: Path) -> Iterator[Row]:
    """The file's inputs, a line at a time; a malformed one is a DataError naming its line."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for number, line in text_lines(path):
            yield Row(f"{path}:{number}", line)
    elif suffix == ".jsonl":
        for number, record in jsonl_records(path):
            yield _json_row(record, f"{path}:{number}")
    else:
        yield from _csv_rows(path)


def _json_row(record: dict[str, Any], where: str) -> Row:
    text, words = record.get("text"), record.get("words")
    if words is not None and not (isinstance(words, list) and all(isinstance(word, str) for word in words)):
        raise DataError(f'{where}: "words" must be a list of strings')
    if not isinstance(text, str) and words is None:
        raise DataError(f'{where}: no "text" string (fields: {", ".join(record) or "none"})')
    return Row(where, text if isinstance(text, str) else join_words(words or []), words)


def _csv_rows(path: Path) -> Iterator[Row]:
    number = 1  # the header's line; rows follow (a quoted newline makes this the row's count, not its line)
    for frame in read_csv(path):
        if "text" not in frame.columns:
            raise DataError(f"{path}: no column 'text' (columns: {', '.join(map(str, frame.columns))})")
        for text in frame["text"]:
            number += 1
            yield Row(f"{path}:{number}", str(text))


def entities(words: list[str], tags: list[str]) -> list[dict[str, Any]]:
    """The entities a BIO tagging marks: their text, type and word span (end exclusive)."""
    from seqeval.metrics.sequence_labeling import get_entities

    found = []
    for kind, start, last in get_entities(list(tags)):
        found.append({"text": join_words(words[start : last + 1]), "type": kind, "start": start, "end": last + 1})
    return found


def request_frame(rows: list[Row]) -> pd.DataFrame:
    """The rows as the served model takes them: a "text" column, and "words" when a row gives its words."""
    from lmforge.inference import split_words

    frame = pd.DataFrame({"text": [row.text for row in rows]})
    if any(row.words is not None for row in rows):  # the served model's own split for the rows that give none
        frame["words"] = [row.words if row.words is not None else split_words(row.text) for row in rows]
    return frame


def answers(model: Any, rows: list[Row], request_params: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One record per row: the input text and the model's answer (with the entities of a tagging)."""
    predicted = model.predict(request_frame(rows), params=request_params)
    records = []
    for row, answer in zip(rows, predicted.to_dict(orient="records"), strict=True):
        record: dict[str, Any] = {"text": row.text}
        for key, value in answer.items():
            record[key] = value.tolist() if hasattr(value, "tolist") else value
        if "tags" in record:
            record["entities"] = entities(record["words"], record["tags"])
        records.append(record)
    return records


def served_model(prefix: str, task: str, version: str | None) -> tuple[str, Any]:
    """(`models:/...` with the version, the loaded pyfunc) of the task's @champion or of `version`."""
    name = registry.model_name(prefix, task)
    version = str(registry.chosen_version(registry.client(), name, task, version).version)
    loaded = registry.load_pyfunc(name, version)
    if isinstance(loaded, str):
        raise LmforgeError(loaded)
    return f"models:/{name}/{version}", loaded


def generation_params(model: Any, max_new_tokens: int | None) -> dict[str, Any] | None:
    """The request's params: how far a generation model continues (its signature declares the key)."""
    schema = model.metadata.get_params_schema()
    if schema is None or all(param.name != "max_new_tokens" for param in schema.params):
        return None
    return None if max_new_tokens is None else {"max_new_tokens": max_new_tokens}


def batches(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def line_count(path: Path) -> int:
    """Lines in the file (the progress bar's total: the rows of txt and jsonl, about those of csv)."""
    count = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
    return count - (1 if path.suffix.lower() == ".csv" else 0)


class Writer:
    """Records to a .jsonl (one object per line) or .csv (lists and entities as JSON in their cells)."""

    def __init__(self, handle: IO[str], suffix: str) -> None:
        self.handle, self.csv = handle, suffix == ".csv"
        self.table: Any = None

    def write(self, records: list[dict[str, Any]]) -> None:
        if not self.csv:
            self.handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            return
        for record in records:
            if self.table is None:
                self.table = csv.DictWriter(self.handle, fieldnames=list(record))
                self.table.writeheader()
            self.table.writerow({key: value if isinstance(value, str | int | float) else
                                 json.dumps(value, ensure_ascii=False) for key, value in record.items()})  # fmt: skip


@dataclass(frozen=True)
class Scored:
    model_uri: str
    rows: int
    output: Path


def predict_file(prefix: str, task: str, input_path: Path, output_path: Path, version: str | None = None,
                 batch_size: int = 32, max_new_tokens: int | None = None, progress: bool = True) -> Scored:  # fmt: skip
    """Score every row of `input_path` with the task's model; write `output_path` whole, or not at all."""
    from tqdm import tqdm

    check_formats(input_path, output_path)
    if batch_size < 1:
        raise LmforgeError(f"--batch-size: {batch_size} is not a positive number of rows")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise LmforgeError(f"--max-new-tokens: {max_new_tokens} is not a positive number of tokens")
    model_uri, model = served_model(prefix, task, version)
    request_params = generation_params(model, max_new_tokens)
    staging = output_path.with_name(f".{output_path.name}.tmp-{os.getpid()}")
    scored = 0
    try:
        # Inside writing(): a disk that refuses (full, read-only) is one line naming the output. The input
        # was opened once before (check_formats), so a read error here is not blamed on the output.
        with writing(output_path, staging):
            output_path.parent.mkdir(parents=True, exist_ok=True)
            with open(staging, "w", encoding="utf-8", newline="") as handle:
                writer = Writer(handle, output_path.suffix.lower())
                # On a terminal only (disable=None): a log file gets the one line of the result, not a bar.
                with tqdm(total=line_count(input_path), unit="rows", desc=f"{task} ({model_uri})", leave=False,
                          disable=None if progress else True) as bar:  # fmt: skip
                    for batch in batches(read_rows(input_path), batch_size):
                        writer.write(answers(model, batch, request_params))
                        scored += len(batch)
                        bar.update(len(batch))
            if scored == 0:
                raise DataError(f"{input_path}: no rows to score")
            os.replace(staging, output_path)
    except BaseException:
        remove(staging)
        raise
    return Scored(model_uri, scored, output_path)
