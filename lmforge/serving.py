"""The MLflow pyfunc of a task model or its baseline, logged as code (MLflow "models from code"), so no pickle.

The artifact `model_dir` is a fine-tuned model folder (safetensors) or a baseline folder
(lmforge/baselines.py: JSON and safetensors). `mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(
{"text": [...]}))` answers the same way for both, by task kind:
- classification:        label, score (the label's probability)
- token_classification:  words, tags (one tag per word; a "words" column of word lists gives the
                         segmentation, as the test split has it; from "text", CJK characters are words
                         of their own)
- generation:            continuation (greedy, up to the request's params={"max_new_tokens": n}, default 24)
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

MAX_NEW_TOKENS = 24


def _words(model_input) -> list[list[str]]:
    """The request's word lists: its "words" column, else its texts split into words."""
    from lmforge.inference import split_words

    if isinstance(model_input, pd.DataFrame) and "words" in model_input.columns:
        return [[str(word) for word in words] for words in model_input["words"]]
    return [split_words(text) for text in _texts(model_input)]


def _texts(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(value) for value in model_input[column]]
    if isinstance(model_input, pd.Series):
        return [str(value) for value in model_input]
    if isinstance(model_input, str):
        return [model_input]
    return [str(value) for value in model_input]


def _labels_and_scores(labels: list[str], probabilities: np.ndarray) -> pd.DataFrame:
    """Each text's most probable label and its probability."""
    best = probabilities.argmax(axis=1)
    return pd.DataFrame({"label": [labels[i] for i in best], "score": probabilities.max(axis=1).astype(float)})


class LmforgeTextModel(PythonModel):
    def load_context(self, context) -> None:
        from lmforge.baselines import is_baseline, load_baseline
        from lmforge.inference import load_task_model

        folder = Path(context.artifacts["model_dir"])
        self.task_model = load_baseline(folder) if is_baseline(folder) else load_task_model(folder)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from lmforge.baselines import MajorityTag, NgramLM, TfidfLogReg
        from lmforge.inference import class_probabilities, generate, word_tags

        tm = self.task_model
        if isinstance(tm, MajorityTag):
            words = _words(model_input)
            return pd.DataFrame({"words": words, "tags": tm.predict(words)})
        if isinstance(tm, TfidfLogReg):
            return _labels_and_scores(tm.labels, tm.probabilities(_texts(model_input)))
        new_tokens = int((params or {}).get("max_new_tokens", MAX_NEW_TOKENS))
        if isinstance(tm, NgramLM):
            return pd.DataFrame({"continuation": tm.generate(_texts(model_input), new_tokens)})
        if tm.kind == "token_classification":
            words = _words(model_input)
            return pd.DataFrame({"words": words, "tags": word_tags(tm, words)})
        if tm.kind == "classification":
            return _labels_and_scores(tm.labels, class_probabilities(tm, _texts(model_input)))
        return pd.DataFrame({"continuation": generate(tm, _texts(model_input), new_tokens)})


mlflow.models.set_model(LmforgeTextModel())
