"""Atomic outputs and content hashes: a failed block leaves the old output, hashes match hashlib."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from lmforge.io import (
    atomic_output_dir,
    files_sha256,
    fingerprint,
    read_json,
    sha256_file,
    sha256_text,
    write_json,
    write_json_atomic,
)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def make_old_output(path: Path) -> None:
    (path / "sub").mkdir(parents=True)
    (path / "old.txt").write_text("old")
    (path / "sub" / "kept.bin").write_bytes(b"\x00\x01")


def test_atomic_output_dir_replaces_the_old_output_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_old_output(out)
    with atomic_output_dir(out) as staging:
        assert staging != out
        assert list(staging.iterdir()) == []  # starts empty, not a copy of the old output
        (staging / "new.txt").write_text("new")
    assert snapshot(out) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging nor retired folder left


def test_atomic_output_dir_leaves_the_old_output_untouched_when_the_block_raises(tmp_path: Path) -> None:
    out = tmp_path / "out"
    make_old_output(out)
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("boom")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_output_dir_creates_nothing_when_a_first_run_fails(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "out"
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out) as staging:
        (staging / "x").write_text("x")
        raise KeyboardInterrupt  # a kill-like BaseException, not only Exception
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_atomic_output_dir_creates_the_output_and_its_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(out) as staging:
        write_json(staging / "m.json", {"k": 1})
    assert read_json(out / "m.json") == {"k": 1}
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_atomic_output_dir_clears_a_stale_staging_folder(tmp_path: Path) -> None:
    """A previous killed run of the same process id may have left its staging folder behind."""
    out = tmp_path / "out"
    with atomic_output_dir(out) as staging:
        pass
    staging.mkdir()
    (staging / "stale.txt").write_text("stale")
    with atomic_output_dir(out) as again:
        assert list(again.iterdir()) == []
        (again / "fresh.txt").write_text("fresh")
    assert snapshot(out) == {"fresh.txt": b"fresh"}


def test_a_killed_writers_staging_and_retired_folders_go_and_a_live_writers_stay(tmp_path: Path) -> None:
    """Left beside an output (models/pretrained/.encoder.tmp-PID) they would sit in the folder DVC hashes."""
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()
    out = tmp_path / "out"
    dead = [tmp_path / f".out.tmp-{ended.pid}", tmp_path / f".out.old-{ended.pid}"]
    live = tmp_path / f".out.tmp-{os.getppid()}"  # a process that still runs: maybe still writing
    for folder in (*dead, live):
        folder.mkdir()
    with atomic_output_dir(out) as staging:
        (staging / "x").write_text("x")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, "out"])


def test_write_json_atomic_writes_sorted_unescaped_json_and_no_staging_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "metrics.json"
    data = {"zeta": [1, 2.5], "alpha": {"标签": "正面"}, "none": None}
    write_json_atomic(path, data)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == data
    assert read_json(path) == data
    assert text.index('"alpha"') < text.index('"none"') < text.index('"zeta"')
    assert "正面" in text  # ensure_ascii=False: readable Chinese, not \u escapes
    assert text.endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_write_json_atomic_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json_atomic(path, {"a": 1, "b": 2})
    write_json_atomic(path, {"a": 3})
    assert read_json(path) == {"a": 3}


def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 41 + b"tail"  # not a multiple of the chunk size
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    expected = hashlib.sha256(payload).hexdigest()
    assert sha256_file(path) == expected
    assert sha256_file(path, chunk_size=7) == expected


def test_sha256_file_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert sha256_file(path) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_sha256_text_hashes_utf8() -> None:
    assert sha256_text("中文 text") == hashlib.sha256("中文 text".encode()).hexdigest()


def test_fingerprint_is_stable_under_dict_key_order() -> None:
    a = fingerprint({"lr": 0.001, "epochs": 3, "model": {"dim": 64, "layers": 2}}, "sentiment")
    b = fingerprint({"model": {"layers": 2, "dim": 64}, "epochs": 3, "lr": 0.001}, "sentiment")
    assert a == b
    assert len(a) == 16 and set(a) <= set("0123456789abcdef")
    assert fingerprint({"lr": 0.002, "epochs": 3, "model": {"dim": 64, "layers": 2}}, "sentiment") != a


@pytest.mark.parametrize(
    "other",
    [
        ({"lr": 0.002, "epochs": 3}, "sentiment"),
        ({"lr": 0.001, "epochs": 3}, "ner"),
        ({"lr": 0.001, "epochs": 3},),
        ("sentiment", {"lr": 0.001, "epochs": 3}),
    ],
)
def test_fingerprint_differs_for_different_inputs(other: tuple) -> None:
    assert fingerprint({"lr": 0.001, "epochs": 3}, "sentiment") != fingerprint(*other)


def test_fingerprint_accepts_paths_by_their_string() -> None:
    assert fingerprint(Path("data/x.jsonl")) == fingerprint("data/x.jsonl")
    assert fingerprint(Path("data/x.jsonl")) != fingerprint(Path("data/y.jsonl"))


def test_files_sha256_hashes_only_the_matching_files_by_name(tmp_path: Path) -> None:
    contents = {"train.jsonl": b"t", "test.jsonl": b"u", "vocab.txt": b"v", "notes.md": b"n"}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.jsonl").write_bytes(b"d")
    found = files_sha256(tmp_path, "*.jsonl", "vocab.*")
    expected = ("train.jsonl", "test.jsonl", "vocab.txt")
    assert found == {name: hashlib.sha256(contents[name]).hexdigest() for name in expected}


def test_files_sha256_with_no_match_is_empty(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    assert files_sha256(tmp_path, "*.jsonl") == {}
