from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge import preprocess
from lmforge.errors import DataError
from lmforge.preprocess import PreprocessPaths
from lmforge.tokenization import read_blocks
from tests.conftest import SmokeRun


def test_smoke_preprocess_outputs(smoke_run: SmokeRun):
    from transformers import AutoTokenizer

    stats = json.loads((smoke_run.root / "reports/preprocess.json").read_text())
    assert not (smoke_run.processed / "stats.json").exists()  # timings would make data/processed differ per run
    meta = json.loads((smoke_run.processed / "pretrain" / "meta.json").read_text())
    block_size = smoke_run.params.preprocess.block_size
    train = read_blocks(smoke_run.processed / "pretrain" / "train.bin", meta["train"]["dtype"], block_size)
    assert train.shape == (meta["train"]["blocks"], block_size)
    assert stats["pretrain"]["train"]["tokens"] > 10_000
    tokenizer = AutoTokenizer.from_pretrained(str(smoke_run.processed / "tokenizer"))
    assert len(tokenizer) == stats["tokenizer"]["vocab_size"] <= smoke_run.params.preprocess.tokenizer.vocab_size
    assert int(train.max()) < len(tokenizer)
    labels = json.loads((smoke_run.processed / "datasets" / "people_daily" / "labels.json").read_text())
    assert labels["labels"] == smoke_run.params.ingest.datasets["people_daily"].labels
    assert stats["peak_rss_mb"] > 0


def test_preprocess_refuses_a_validation_report_of_another_test_split(smoke_run: SmokeRun, tmp_path: Path):
    validation = tmp_path / "validation"
    shutil.copytree(smoke_run.validation, validation)
    report = json.loads((validation / "sentiment.json").read_text())
    report["test_sha256"] = "0" * 64
    (validation / "sentiment.json").write_text(json.dumps(report))
    out = tmp_path / "processed"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    with pytest.raises(DataError, match="validated a different test split"):
        paths = PreprocessPaths(smoke_run.raw, validation, out, tmp_path / "m.json")
        preprocess.run(smoke_run.params.preprocess, paths)
    assert (out / "keep.txt").read_text() == "earlier output"  # written aside, never swapped in


def test_a_dataset_in_a_script_the_tokenizer_never_saw_is_warned_about(smoke_run: SmokeRun, tmp_path: Path):
    import pandas as pd
    from tokenizers import Tokenizer

    from lmforge.artifacts import PreprocessReport, TokenizedSplit
    from lmforge.tokenization import tokenize_split

    source = tmp_path / "train.parquet"
    pd.DataFrame({"text": ["привет как дела", "где мой заказ"] * 5, "label": ["a", "b"] * 5}).to_parquet(source)
    tokenizer = Tokenizer.from_file(str(smoke_run.processed / "tokenizer" / "tokenizer.json"))
    stats = tokenize_split(tokenizer, "classification", source, tmp_path / "out.parquet", ["a", "b"], 100)
    assert stats["unknown_fraction"] > 0.5  # every Cyrillic word is [UNK] to a tokenizer of Chinese reviews

    report = PreprocessReport.read(smoke_run.root / "reports" / "preprocess.json")
    paths = PreprocessPaths(smoke_run.raw, smoke_run.validation, smoke_run.processed, tmp_path / "report.json")
    warned = report.model_copy(update={"datasets": {**report.datasets, "orders": {"train": TokenizedSplit(**stats)}}})
    lines = preprocess.summary(warned, paths).splitlines()
    (line,) = [line for line in lines if "warning" in line and "orders" in line]
    assert "ingest.datasets.orders.in_corpus" in line and "preprocess.tokenizer.vocab_size" in line
    covered = report.model_copy(
        update={"datasets": {"orders": {"train": TokenizedSplit(**{**stats, "unknown_fraction": 0.01})}}}
    )
    assert "warning" not in preprocess.summary(covered, paths)
