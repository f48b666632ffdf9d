"""Stage start-up: seconds a fresh process spends importing each stage before it does any work.

Every `dvc repro` stage and every Prefect task is a new `python -m stages.<name>` process, so these
seconds are paid 17 times in a default run. Each row is `python -c "import lmforge.<stage>"` in a new
process, median of --repeats, interleaved; `python -c pass` is the floor.

    python -m bench.startup [--repeats 5]

Prints a table and writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import describe
from lmforge.schema import STAGES

RESULTS = Path(__file__).resolve().parent / "results"


def seconds_to_import(module: str | None) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}" if module else "pass"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    modules: dict[str, str | None] = {"python (nothing)": None, **{stage: f"lmforge.{stage}" for stage in STAGES}}
    timings: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(args.repeats):
        for name, module in modules.items():
            timings[name].append(seconds_to_import(module))
    rows = [{"stage": name, "seconds": statistics.median(values), "runs": values} for name, values in timings.items()]
    print(f"{'stage':<18} {'import s':>9}")
    for row in rows:
        print(f"{row['stage']:<18} {row['seconds']:>9.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps({"machine": describe(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
