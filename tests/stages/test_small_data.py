"""A user's small, skewed dataset trains into a model that predicts more than the majority class.

The set is made up here: about 600 training rows of English intents in 21 classes, from 110 rows down
to 4, declared as docs/your-own-data.md says (a task entry with no training keys). Before the
small-data recipe (min_steps, class_weights) the default took 19 optimizer steps on it, and a real
set of that shape ended at macro-F1 0.02 (every prediction the majority class).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lmforge.params import Params, deep_merge, params_to_dict, parse_params, profile_params, render_params_yaml
from lmforge.stage import dvc_paths
from tests.conftest import REPO, run_in, sh

pytestmark = pytest.mark.slow

TOPICS = ["weather", "alarm", "music", "timer", "recipe", "traffic", "news", "joke", "calendar", "email",
          "lights", "shopping", "translate", "flight", "hotel", "taxi", "bank", "movie", "podcast", "sports",
          "reminder"]  # fmt: skip
PHRASINGS = ["can you help with {topic} {filler}", "{filler} i need the {topic} now", "open {topic} for {filler}",
             "what about my {topic} {filler}", "{filler} show me {topic}", "start {topic} {filler} thanks"]  # fmt: skip
FILLERS = ["please", "today", "tonight", "quickly", "again", "for me", "right away", "later", "this morning",
           "for my family", "at work", "on the phone", "if you can", "soon", "before noon", "after lunch"]  # fmt: skip


def write_skewed_intents(path: Path, seed: int = 0) -> pd.DataFrame:
    """21 intents, the largest 110 rows and the smallest 5 (about 750 rows: 600 to train on)."""
    rng = random.Random(seed)
    records = []
    for rank, topic in enumerate(TOPICS):
        for _ in range(max(5, round(110 * 0.86**rank))):
            filler = " ".join(rng.sample(FILLERS, 2))
            text = rng.choice(PHRASINGS).format(topic=topic, filler=filler)
            records.append({"utterance": text, "intent": topic})
    frame = pd.DataFrame(records).sample(frac=1.0, random_state=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return frame


def dvc_repo(root: Path, params: Params) -> Path:
    """A DVC repository holding this dvc.yaml and `params` as its params.yaml (nothing else)."""
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(render_params_yaml(params, "smoke"), encoding="utf-8")
    sh("dvc", "init", "--no-scm", "-q", cwd=root)
    return root


def test_a_small_skewed_intent_set_does_not_collapse_to_the_majority_class(tmp_path: Path):
    frame = write_skewed_intents(tmp_path / "data/external/intents.csv")
    smoke = params_to_dict(profile_params("smoke"))
    smoke["ingest"]["datasets"] = {}
    smoke["finetune"]["tasks"] = {}
    smoke["optimize"]["n_trials"], smoke["promote"]["floors"] = {}, {}
    # The default encoder's size (the smoke profile's is too small to learn 21 classes), smoke pretraining.
    smoke["pretrain"]["models"] = {"encoder": params_to_dict(Params())["pretrain"]["models"]["encoder"]}
    user = {  # the walkthrough's declaration (docs/your-own-data.md), with the class-share floor it asks for
        "ingest": {"datasets": {"intents": {"kind": "classification", "source": {
            "kind": "local", "path": "data/external/intents.csv", "text_column": "utterance",
            "label_column": "intent"}}}},
        "validate": {"min_class_fraction": 0.002},  # the smallest class: 6 rows, 3 of them in train
        "finetune": {"tasks": {"intent": {"dataset": "intents", "kind": "classification",
                                          "base": "encoder"}}},
        "evaluate": {"max_test_samples": None},
    }  # fmt: skip
    params = parse_params(deep_merge(smoke, user))
    run_in("ingest", params, tmp_path, root=tmp_path)  # the repository root the source path is relative to
    for stage in ("validate", "preprocess", "pretrain@encoder"):
        run_in(stage, params, tmp_path)
    repo = dvc_repo(tmp_path / "repo", params)
    for stage in ("finetune", "evaluate"):  # the paths dvc.yaml gives the new task, resolved by DVC from these params
        paths = dvc_paths(f"{stage}@intent", repo)
        moved = {field.name: tmp_path / getattr(paths, field.name) for field in dataclasses.fields(paths)}
        run_in(f"{stage}@intent", params, tmp_path, like=f"{stage}@ner", **moved)

    finetuned = json.loads((tmp_path / "reports/finetune/intent.json").read_text())
    assert finetuned["steps"] >= 100  # 600 rows in batches of 32 are 19 steps an epoch
    figures = json.loads((tmp_path / "metrics/evaluate/intent.json").read_text())
    majority_share = frame["intent"].value_counts(normalize=True).iloc[0]
    majority_macro_f1 = 2 * majority_share / (1 + majority_share) / len(TOPICS)  # F1 of one class, zero for the rest
    assert figures["primary"] > 10 * majority_macro_f1, figures
    assert figures["primary"] > 0.5 * figures["baseline"], figures
