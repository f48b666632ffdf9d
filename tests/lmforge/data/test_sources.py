from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lmforge.data.sources import (
    CHUNK_ROWS,
    join_words,
    open_source,
    parse_tagged_line,
    read_tagged,
    utf8_lines,
    words_to_bio,
)
from lmforge.errors import DataError
from lmforge.schema import DatasetSpec, HuggingFaceSource, LocalSource


def local(kind: str, path: str, **options) -> DatasetSpec:
    return DatasetSpec(kind=kind, source=LocalSource(path=path, **options))


def load_source(name: str, spec: DatasetSpec, root: Path) -> pd.DataFrame:
    """The whole source as one table (these sources are small)."""
    return pd.concat(list(open_source(name, spec, root).chunks), ignore_index=True)


def test_tagged_line_parses_words_and_tags_and_rejects_a_token_without_a_tag():
    assert parse_tagged_line("迈向/v  充满/v 希望/n", "f:1") == (["迈向", "充满", "希望"], ["v", "v", "n"])
    assert parse_tagged_line("1/2/m", "f:1") == (["1/2"], ["m"])  # the last slash separates the tag
    with pytest.raises(DataError, match=r"f:7: malformed tagged token '希望' \(expected word/TAG\)"):
        parse_tagged_line("迈向/v 希望", "f:7")


def test_ner_tags_merge_a_split_person_name_but_not_adjacent_places():
    assert words_to_bio(["nr", "nr", "v", "ns", "ns", "nt", "n"]) == [
        "B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG", "O",
    ]  # fmt: skip


def test_join_words_spaces_only_between_non_cjk_words():
    assert join_words(["中共中央", "总书记", "、", "江", "泽民"]) == "中共中央总书记、江泽民"
    assert join_words(["New", "York", "是", "城市"]) == "New York 是城市"


def test_text_file_errors_name_the_file_and_line(tmp_path: Path):
    with pytest.raises(DataError, match=r"missing\.txt: file not found"):
        list(utf8_lines(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match=r"empty\.txt: file is empty"):
        list(utf8_lines(empty))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\nd\xe9j\xe0 vu\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt:2: not valid UTF-8"):
        list(utf8_lines(latin))


def test_tagged_file_error_names_the_line(tmp_path: Path):
    path = tmp_path / "pd.txt"
    path.write_text("江/nr 泽民/nr\n讲话/n 发表\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pd.txt:2: malformed tagged token '发表'"):
        list(read_tagged(path, "ner"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_local_classification_files_map_their_columns(tmp_path: Path, fmt: str):
    frame = pd.DataFrame({"review": ["good", "bad", "fine"], "stars": ["pos", "neg", "pos"], "extra": [1, 2, 3]})
    path = tmp_path / f"reviews.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    spec = local("classification", path.name, text_column="review", label_column="stars")
    table = load_source("reviews", spec, tmp_path)
    assert table.to_dict("list") == {"text": ["good", "bad", "fine"], "label": ["pos", "neg", "pos"]}
    assert len(open_source("reviews", spec, tmp_path).sha256()) == 64


def test_csv_without_the_text_column_names_column_file_and_key(tmp_path: Path):
    path = tmp_path / "reviews.csv"
    path.write_text("body,label\nhello,pos\n")
    with pytest.raises(DataError) as caught:
        load_source("reviews", local("classification", "reviews.csv"), tmp_path)
    message = str(caught.value)
    assert "reviews.csv: no column 'text' (columns: body, label)" in message
    assert "ingest.datasets.reviews.source.text_column" in message


def test_jsonl_token_classification_and_a_bad_json_line(tmp_path: Path):
    path = tmp_path / "ner.jsonl"
    rows = [{"tokens": ["Ada", "lives", "here"], "tags": ["B-PER", "O", "O"]}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    table = load_source("ner", local("token_classification", "ner.jsonl"), tmp_path)
    assert table.loc[0, "text"] == "Ada lives here"
    assert table.loc[0, "tags"] == ["B-PER", "O", "O"]
    path.write_text('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": [\n')
    with pytest.raises(DataError, match=r"ner.jsonl:2: not valid JSON"):
        load_source("ner", local("token_classification", "ner.jsonl"), tmp_path)


def test_txt_feeds_a_corpus_but_not_a_labelled_task(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("one\n\n two \n", encoding="utf-8")
    assert load_source("notes", local("corpus", "notes.txt"), tmp_path)["text"].tolist() == ["one", "two"]
    with pytest.raises(DataError, match="a txt file has no labels"):
        load_source("notes", local("classification", "notes.txt"), tmp_path)


def test_huggingface_dataset_from_a_local_save_to_disk_folder(tmp_path: Path):
    import datasets

    saved = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"sentence": ["a b", "c d"], "polarity": [1, 0]})}
    )
    saved.save_to_disk(str(tmp_path / "hf_reviews"))
    spec = DatasetSpec(
        kind="classification",
        source=HuggingFaceSource(name="hf_reviews", text_column="sentence", label_column="polarity"),
    )
    assert load_source("reviews", spec, tmp_path).to_dict("list") == {"text": ["a b", "c d"], "label": ["1", "0"]}
    wrong_split = spec.model_copy(update={"source": spec.source.model_copy(update={"split": "test"})})
    with pytest.raises(DataError, match="has no split 'test'"):
        load_source("reviews", wrong_split, tmp_path)


def test_huggingface_dataset_from_a_folder_of_data_files(tmp_path: Path):
    folder = tmp_path / "hf_files"
    folder.mkdir()
    pd.DataFrame({"text": ["x", "y"], "label": ["a", "b"]}).to_parquet(folder / "train.parquet")
    spec = DatasetSpec(kind="classification", source=HuggingFaceSource(name="hf_files"))
    assert load_source("files", spec, tmp_path)["label"].tolist() == ["a", "b"]


def test_a_csv_is_read_a_chunk_at_a_time_and_its_errors_name_the_line(tmp_path: Path):
    import csv

    path = tmp_path / "big.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerow(["two\nlines, quoted", "pos"])
        writer.writerows([f"row {i}", "007"] for i in range(CHUNK_ROWS + 4))
    chunks = list(open_source("big", local("classification", "big.csv"), tmp_path).chunks)
    assert [len(chunk) for chunk in chunks] == [CHUNK_ROWS, 5]
    assert chunks[0].loc[0, "text"] == "two\nlines, quoted" and chunks[1].iloc[-1]["label"] == "007"  # as written
    path.write_text("text,label\na,pos\n\nb,neg,extra\n")
    with pytest.raises(DataError, match=r"big.csv:4: not valid CSV \(expected 2 fields, saw 3\)"):
        load_source("big", local("classification", "big.csv"), tmp_path)
