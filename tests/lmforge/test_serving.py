"""The MLflow pyfunc (lmforge/serving.py): a baseline folder loads and answers the task model's predict contract."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from lmforge.baselines import TfidfLogReg
from lmforge.serving import LmforgeTextModel
from tests.lmforge.test_baselines import NEGATIVE, POSITIVE, char_tokenizer, fit_ngram

__all__ = ["char_tokenizer"]  # the fixture, shared with the baselines' tests


def test_the_pyfunc_serves_a_baseline_like_a_task_model(tmp_path: Path):
    """lmforge/serving.py loads a baseline folder and answers the same predict contract."""
    TfidfLogReg.fit(POSITIVE + NEGATIVE, ["pos"] * 5 + ["neg"] * 5, ["neg", "pos"]).save(tmp_path / "m")
    served = LmforgeTextModel()
    served.load_context(SimpleNamespace(artifacts={"model_dir": str(tmp_path / "m")}))
    answer = served.predict(None, pd.DataFrame({"text": ["真好真好", "真差真差"]}))
    assert answer["label"].tolist() == ["pos", "neg"] and answer["score"].between(0.5, 1).all()


def test_the_pyfunc_serves_the_ngram_baseline_with_a_max_new_tokens_request_param(char_tokenizer, tmp_path: Path):
    fit_ngram(char_tokenizer).save(tmp_path / "m")
    served = LmforgeTextModel()
    served.load_context(SimpleNamespace(artifacts={"model_dir": str(tmp_path / "m")}))
    request = pd.DataFrame({"text": ["明天"]})
    assert served.predict(None, request)["continuation"].tolist() == ["天气很好"]
    assert served.predict(None, request, params={"max_new_tokens": 2})["continuation"].tolist() == ["天气"]
