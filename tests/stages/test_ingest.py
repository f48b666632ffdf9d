from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lmforge import ingest
from lmforge.artifacts import SPLITS, Manifest
from lmforge.ingest import IngestPaths
from lmforge.params import Params, params_to_dict
from tests.conftest import REPO, SmokeRun, run_stage, tree_digest


def test_smoke_ingest_writes_splits_and_manifests(smoke_run: SmokeRun):
    for dataset, task in (("sentiment", "classification"), ("people_daily", "token_classification")):
        manifest = pd.read_json(smoke_run.raw / dataset / "manifest.json", typ="series")
        assert manifest["kind"] == task
        rows = manifest["rows"]
        assert rows["train"] + rows["val"] + rows["test"] == rows["kept"]
        assert rows["kept"] == smoke_run.params.ingest.datasets[dataset].max_rows
        test = pd.read_parquet(smoke_run.raw / dataset / "test.parquet")
        assert len(test) == rows["test"]
    counts = pd.read_json(smoke_run.raw / "sentiment" / "manifest.json", typ="series")["labels"]["counts"]
    assert set(counts["test"]) == {"neg", "pos"}  # stratified: both classes in the frozen test split


def test_reingest_is_byte_identical(smoke_run: SmokeRun, smoke_params: Params, tmp_path: Path):
    ingest.run(smoke_params.ingest, IngestPaths(REPO, tmp_path / "raw", tmp_path / "ingest.json"))
    assert tree_digest(tmp_path / "raw") == tree_digest(smoke_run.raw)


def test_pretraining_corpus_holds_no_validation_or_test_text(smoke_run: SmokeRun):
    corpus_lines = set()
    for side in ("train", "val"):
        corpus_lines |= set((smoke_run.raw / "corpus" / f"{side}.txt").read_text(encoding="utf-8").splitlines())
    train_texts = set()
    for dataset in ("sentiment", "people_daily"):
        for split in ("val", "test"):
            held_out = pd.read_parquet(smoke_run.raw / dataset / f"{split}.parquet")["text"]
            assert not corpus_lines & {" ".join(text.split()) for text in held_out}
        train_texts |= {" ".join(t.split()) for t in pd.read_parquet(smoke_run.raw / dataset / "train.parquet")["text"]}
    assert corpus_lines == train_texts


# --- bad input: one line, non-zero exit, earlier outputs untouched -----------------------------------


def clear_tasks(data: dict) -> None:
    """The default tasks name datasets these files do not declare: drop them and what refers to them."""
    data["finetune"]["tasks"], data["optimize"]["n_trials"], data["promote"]["floors"] = {}, {}, {}


def local_params(tmp_path: Path, file_name: str, task: str = "classification", **source) -> Path:
    data = params_to_dict(Params())
    data["ingest"]["datasets"] = {
        "mine": {"kind": task, "source": {"kind": "local", "path": file_name, **source}, "labels": None}
    }
    clear_tasks(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.fixture
def good_ingest(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A successful ingest of a local CSV into tmp_path/raw, and the digest of what it wrote."""
    rows = [{"text": f"review number {i}", "label": "pos" if i % 3 else "neg"} for i in range(60)]
    pd.DataFrame(rows).to_csv(tmp_path / "good.csv", index=False)
    result = run_stage(
        "ingest",
        "--params",
        local_params(tmp_path, "good.csv"),
        "--root",
        tmp_path,
        "--out",
        tmp_path / "raw",
        "--report",
        tmp_path / "ingest.json",
    )
    assert result.returncode == 0, result.stderr
    return tmp_path, tree_digest(tmp_path / "raw")


def write_bad(root: Path, case: str) -> tuple[str, dict]:
    """Write the bad input for `case`; return its file name and extra source options."""
    if case == "missing":
        return "absent.csv", {}
    if case == "empty":
        (root / "empty.csv").write_text("")
        return "empty.csv", {}
    if case == "non_utf8":
        (root / "latin.csv").write_bytes("text,label\ncaf\xe9,pos\n".encode("latin-1"))
        return "latin.csv", {}
    if case == "no_text_column":
        (root / "cols.csv").write_text("body,label\nhello,pos\n")
        return "cols.csv", {}
    if case == "malformed_alpaca":
        (root / "al.jsonl").write_text('{"instruction": "问候", "output": "你好"}\n{"instruction": "道别"}\n',
                                       encoding="utf-8")  # fmt: skip
        return "al.jsonl", {"format": "alpaca"}
    if case == "malformed_sharegpt":
        talk = {"conversations": [{"from": "human", "value": "在吗"}, {"from": "robot", "value": "在"}]}
        (root / "sg.jsonl").write_text(json.dumps(talk, ensure_ascii=False) + "\n", encoding="utf-8")
        return "sg.jsonl", {"format": "sharegpt"}
    (root / "pd.txt").write_text("江/nr 泽民/nr\n发表/v 讲话\n", encoding="utf-8")
    return "pd.txt", {"format": "tagged", "tagging": "ner"}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "absent.csv: file not found"),
        ("empty", "empty.csv: file is empty"),
        ("non_utf8", "latin.csv:2: not valid UTF-8"),
        ("no_text_column", "cols.csv: no column 'text'"),
        ("malformed_tagged", "pd.txt:2: malformed tagged token '讲话'"),
        ("malformed_alpaca", "al.jsonl:2: 'output' must be a string (missing)"),
        ("malformed_sharegpt", "sg.jsonl:1: conversations[1]: 'from' is 'robot'; expected one of"),
    ],
)
def test_bad_input_fails_in_one_line_and_leaves_outputs(good_ingest, case: str, expected: str):
    root, before = good_ingest
    file_name, options = write_bad(root, case)
    task = {"malformed_tagged": "token_classification", "malformed_alpaca": "instruction",
            "malformed_sharegpt": "instruction"}.get(case, "classification")  # fmt: skip
    result = run_stage(
        "ingest",
        "--params",
        local_params(root, file_name, task, **options),
        "--root",
        root,
        "--out",
        root / "raw",
        "--report",
        root / "ingest.json",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert tree_digest(root / "raw") == before
    assert not list(root.glob(".raw.tmp-*"))  # the staging folder is cleaned up


def test_unknown_params_key_fails_before_touching_outputs(good_ingest):
    root, before = good_ingest
    params = root / "params.yaml"
    params.write_text(params.read_text() + "\nunknown_section: {a: 1}\n")
    result = run_stage("ingest", "--params", params, "--root", root, "--out", root / "raw",
                       "--report", root / "ingest.json")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {params}: unknown_section: unknown key"
    assert tree_digest(root / "raw") == before


def test_hub_dataset_offline_fails_clearly(tmp_path: Path):
    data = params_to_dict(Params())
    data["ingest"]["datasets"] = {
        "imdb": {"kind": "classification", "source": {"kind": "hf", "name": "stanfordnlp/imdb"}}
    }
    clear_tasks(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    result = run_stage(
        "ingest",
        "--params",
        tmp_path / "params.yaml",
        "--root",
        tmp_path,
        "--out",
        tmp_path / "raw",
        "--report",
        tmp_path / "m.json",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    assert "ingest.datasets.imdb.source.name: cannot load Hugging Face dataset 'stanfordnlp/imdb'" in result.stderr
    assert not (tmp_path / "raw").exists()


def test_appended_rows_stay_where_they_were_and_the_manifest_counts_what_is_new(good_ingest):
    root, before = good_ingest
    sides = {split: set(pd.read_parquet(root / "raw/mine" / f"{split}.parquet")["text"]) for split in SPLITS}
    appended = [{"text": f"review number {i}", "label": "pos" if i % 3 else "neg"} for i in range(60, 100)]
    pd.DataFrame(appended).to_csv(root / "good.csv", mode="a", header=False, index=False)
    again = ["ingest", "--params", root / "params.yaml", "--root", root, "--out", root / "raw",
             "--report", root / "ingest.json"]  # fmt: skip
    assert run_stage(*again).returncode == 0
    now = {split: set(pd.read_parquet(root / "raw/mine" / f"{split}.parquet")["text"]) for split in SPLITS}
    assert all(sides[split] <= now[split] for split in SPLITS)  # no old row changed split
    manifest = Manifest.of(root / "raw/mine")
    assert manifest.changes is not None
    new = {split: change.new for split, change in manifest.changes.splits.items()}
    assert new == {split: len(now[split] - sides[split]) for split in SPLITS} and sum(new.values()) == 40
    assert {change.removed + change.moved_in for change in manifest.changes.splits.values()} == {0}
    assert manifest.changes.previous_label_counts["train"] != manifest.labels.counts["train"]
    # Ingesting the same source again writes the same bytes, the record of what was new included.
    digest = tree_digest(root / "raw")
    assert run_stage(*again).returncode == 0
    assert tree_digest(root / "raw") == digest != before
