"""The docs' "Your own data" walkthrough, command by command, in a fresh clone (smoke profile).

The commands and the YAML are read from docs/your-own-data.md itself (its "Walkthrough" section: every
bash line is a command, the one yaml block is what the user adds), so the page cannot drift from what works.
The data is an English intent set that is not bundled: imbalanced classes and duplicate rows.
"""

from __future__ import annotations

import random
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lmforge.artifacts import PromoteReport
from lmforge.params import deep_merge
from tests.conftest import REPO, clone_working_tree, sh

pytestmark = pytest.mark.slow

INTENTS = {  # intent: (share of rows, phrasings)
    "weather": (0.4, ["what is the weather in {}", "will it rain in {} tomorrow", "is it sunny in {}"]),
    "alarm": (0.3, ["wake me up at {}", "set an alarm for {}", "cancel my {} alarm"]),
    "music": (0.2, ["play some {} music", "put on {} songs", "i want to hear {}"]),
    "greeting": (0.1, ["hello there {}", "good morning {}", "hi {} how are you"]),
}
FILLERS = ["paris", "london", "seven", "noon", "jazz", "rock", "friend", "boston", "six thirty", "classical",
           "tokyo", "berlin", "eight", "blues", "pal", "madrid"]  # fmt: skip


def write_intents(path: Path, rows: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    records = []
    for intent, (share, phrasings) in INTENTS.items():
        for _ in range(int(rows * share)):
            records.append({"utterance": rng.choice(phrasings).format(rng.choice(FILLERS)), "intent": intent})
    records += records[:20]  # duplicates, as real exports have: ingest drops them before splitting
    frame = pd.DataFrame(records).sample(frac=1.0, random_state=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return frame


def docs_section(page: str, title: str) -> str:
    """The text of `## <title>` in docs/<page>, up to the next `## ` heading."""
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def test_the_readme_walkthrough_trains_registers_and_gates_a_new_task(tmp_path: Path):
    section = docs_section("your-own-data.md", "Walkthrough")
    commands = [line for block in blocks(section, "bash") for line in block.splitlines() if line.strip()]
    (declared,) = blocks(section, "yaml")
    clone = clone_working_tree(tmp_path)

    for command in commands:
        args = shlex.split(command)
        if args[0] == "cp":  # the user's own file: this test writes one where the walkthrough copies it to
            write_intents(clone / args[-1])
            continue
        if args[:2] == ["lmforge", "params"]:  # before the check, the user edits params.yaml as step 2 says
            params = yaml.safe_load((clone / "params.yaml").read_text())
            (clone / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, yaml.safe_load(declared))))
        if args[0] == "lmforge":
            args = ["python", "-m", "lmforge.cli", *args[1:]]
        result = sh(*args, cwd=clone)
        if args[:2] == ["dvc", "add"]:
            status = sh("git", "status", "--porcelain", cwd=clone).stdout
            assert "?? data/external/intents.csv.dvc" in status and "intents.csv\n" not in status

    report = PromoteReport.read(clone / "reports/promote/intent.json")
    assert report.baseline_decision == "pass" and report.decision in ("pass", "fail")
    assert report.champion_after is not None  # the baseline at least: a new task needs no floor
    assert any("baseline" in reason for reason in report.reasons)
    split, *shown = result.stdout.splitlines()  # `lmforge compare --task intent`, the last command
    assert split.startswith("on test split ")  # every figure below is on that one split
    assert shown[0].startswith(" champion  version") and "macro_f1" in shown[0] and "comparable" not in shown[0]
    assert any(line.startswith(" baseline  version") for line in shown)
    rows = yaml.safe_load((clone / "data/raw/intents/manifest.json").read_text())["rows"]
    assert rows["duplicates_dropped"] >= 20 and rows["train"] + rows["val"] + rows["test"] == rows["kept"]
