"""Instruction data readers: alpaca-style and sharegpt-style JSON lines, and chatterbot-corpus's conversations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from lmforge.data.sources import open_chatterbot_corpus, read_alpaca, read_sharegpt
from lmforge.errors import DataError


def write_lines(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def test_alpaca_prompt_is_the_instruction_then_its_input(tmp_path: Path):
    path = write_lines(tmp_path / "a.jsonl", [
        {"instruction": "翻译成英文", "input": "你好", "output": "hello"},
        {"instruction": "问候一下", "input": "", "output": "你好！"},
        {"instruction": "道别", "output": "再见"},
    ])  # fmt: skip
    rows = pd.concat(read_alpaca(path))
    assert rows.to_dict("records") == [
        {"text": "翻译成英文\n你好", "response": "hello"},
        {"text": "问候一下", "response": "你好！"},
        {"text": "道别", "response": "再见"},
    ]


def test_every_sharegpt_reply_is_an_example_with_the_conversation_before_it(tmp_path: Path):
    turns = [("system", "你是客服"), ("human", "在吗"), ("gpt", "在的"), ("human", "怎么还款"), ("gpt", "在App里还款")]
    talk = [{"from": role, "value": value} for role, value in turns]
    opening_reply = [{"from": "gpt", "value": "您好"}, {"from": "user", "value": "你好"}]
    path = write_lines(tmp_path / "s.jsonl", [{"conversations": talk}, {"conversations": opening_reply}])
    rows = pd.concat(read_sharegpt(path))
    assert rows.to_dict("records") == [
        {"text": "你是客服\n在吗", "response": "在的"},
        {"text": "你是客服\n在吗\n在的\n怎么还款", "response": "在App里还款"},
    ]  # a reply that opens a conversation answers nothing: skipped


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": []}, "s.jsonl:2: expected a non-empty 'conversations' list (sharegpt format)"),
        ({"conversations": ["hi"]}, "s.jsonl:2: conversations[0]: expected an object with 'from' and 'value'"),
        ({"conversations": [{"from": "human", "value": 3}]}, "s.jsonl:2: conversations[0]: 'value' must be a string"),
    ],
)
def test_a_malformed_sharegpt_record_is_one_line_naming_its_line(tmp_path: Path, record: dict, message: str):
    good = {"conversations": [{"from": "human", "value": "在吗"}, {"from": "gpt", "value": "在"}]}
    path = write_lines(tmp_path / "s.jsonl", [good, record])
    with pytest.raises(DataError, match=re.escape(message)):
        list(read_sharegpt(path))


def test_chatterbot_conversations_become_message_reply_pairs():
    stream = open_chatterbot_corpus("chinese", "ingest.datasets.replies")
    rows = pd.concat(stream.chunks)
    assert list(rows.columns) == ["text", "response"] and len(rows) == 552
    assert ("你好", "嗨") in set(zip(rows["text"], rows["response"], strict=True))
    assert rows["text"].nunique() == 447  # ingest keeps the first reply of each message
    unknown = "ingest.datasets.replies.source.language: chatterbot-corpus has no 'klingon'"
    with pytest.raises(DataError, match=re.escape(unknown)):
        open_chatterbot_corpus("klingon", "ingest.datasets.replies")
