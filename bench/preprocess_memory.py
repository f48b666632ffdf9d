"""Does preprocess stream? Peak RSS and throughput at 1x and 4x the bundled corpus, in one run.

Ingests and validates the default datasets once into a temporary folder, then makes a 4x copy of
data/raw (the corpus and every train split repeated four times, each copy's lines rotated so the
text differs), and runs the preprocess stage on each in a fresh process. Prints a table and writes
reports/bench/preprocess_memory.json. Streaming means the 4x/1x peak RSS ratio stays near 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from lmforge import ingest, validate
from lmforge.ingest import IngestPaths
from lmforge.params import load_params
from lmforge.validate import ValidatePaths

REPO = Path(__file__).resolve().parent.parent


def rotate(text: str, shift: int) -> str:
    return text[shift % len(text) :] + text[: shift % len(text)] if text else text


def scale_raw(raw: Path, out: Path, factor: int) -> None:
    """Copy data/raw with the corpus and train splits `factor` times as large (val/test untouched)."""
    shutil.copytree(raw, out)
    lines = (raw / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
    with open(out / "corpus" / "train.txt", "w", encoding="utf-8") as handle:
        for copy in range(factor):
            handle.writelines(rotate(line, 7 * copy) + "\n" for line in lines)
    for train in raw.glob("*/train.parquet"):
        frame = pd.read_parquet(train)
        pd.concat([frame] * factor, ignore_index=True).to_parquet(out / train.parent.name / "train.parquet")


def preprocess(raw: Path, validation: Path, out: Path) -> dict:
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.preprocess",
            "--params",
            str(REPO / "params.yaml"),
            "--raw",
            str(raw),
            "--validation",
            str(validation),
            "--out",
            str(out / "processed"),
            "--metrics",
            str(out / "stats.json"),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    stats = json.loads((out / "stats.json").read_text())
    stats["wall_seconds"] = round(time.perf_counter() - started, 2)
    return stats


def main() -> None:
    params = load_params(REPO / "params.yaml")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        root = Path(tmp)
        ingest.run(params.ingest, IngestPaths(REPO, root / "raw1", root / "ingest.json"))
        validate.run(params.validate_, ValidatePaths(root / "raw1", root / "validation", root / "validate.json"))
        scale_raw(root / "raw1", root / "raw4", 4)
        for factor in (1, 4):
            stats = preprocess(root / f"raw{factor}", root / "validation", root / f"out{factor}")
            train = stats["pretrain"]["train"]
            task_tokens = sum(s["train"]["tokens"] for s in stats["tasks"].values())
            rows.append(
                {
                    "corpus": f"{factor}x",
                    "pretrain_tokens": train["tokens"],
                    "task_train_tokens": task_tokens,
                    "seconds": stats["seconds"],
                    "tokens_per_second": round((train["tokens"] + task_tokens) / stats["seconds"]),
                    "peak_rss_mb": stats["peak_rss_mb"],
                }
            )
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(
        f"{'corpus':>6} {'pretrain tokens':>16} {'task tokens':>12} {'seconds':>8} {'tokens/s':>10} {'peak RSS MB':>12}"
    )
    for row in rows:
        print(
            f"{row['corpus']:>6} {row['pretrain_tokens']:>16,} {row['task_train_tokens']:>12,} {row['seconds']:>8} "
            f"{row['tokens_per_second']:>10,} {row['peak_rss_mb']:>12}"
        )
    print(f"peak RSS ratio 4x/1x: {ratio:.2f} (1.00 = memory does not grow with the corpus)")
    out = REPO / "reports" / "bench" / "preprocess_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "peak_rss_ratio_4x_1x": round(ratio, 3)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
