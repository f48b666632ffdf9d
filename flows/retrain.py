"""Scheduled retraining: when the source data changed, run the pipeline (and so the gate).

The fingerprint of each dataset's source is the sha256 that ingest writes into its manifest, so
"changed" means exactly "ingest would now write different splits": nothing changed ends the flow
run in seconds. Sources DVC cannot see change on its own (a file inside a package, for the bundled
corpora) are handled by forcing the ingest stage when their hash moved.

    python -m flows.retrain            # one run now
    python -m flows.retrain --serve    # serve the cron schedule (orchestrate.retrain_cron) on this machine

`--serve` needs a Prefect server with a scheduler: PREFECT_API_URL's, or one it starts itself on
loopback (flows/server.py), whose UI then shows the schedule and its runs.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import pipeline, promote_reports, promotion_markdown, stage_params
from flows.server import ephemeral_api_settings, prefect_api
from lmforge.errors import run_main
from lmforge.ingest import changed_datasets
from lmforge.stage import dvc_paths


@flow(name="lmforge-retrain", log_prints=True)
def retrain(params_path: str = "params.yaml", force: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    params = stage_params(params_path)
    ingest = dvc_paths("ingest")  # where dvc.yaml puts the datasets, and what their source paths are relative to
    changed = changed_datasets(params.ingest, ingest.out, ingest.root)
    if not changed and not force:
        logger.info("no new data: every source matches its manifest; nothing to retrain")
        create_markdown_artifact("# lmforge retrain\n\nNo new data: nothing to do.", key="lmforge-retrain")
        return {"retrained": False, "changed": []}
    logger.info(f"new data in {changed or 'none (forced)'}: running the pipeline and the gate")
    results = pipeline(params_path, force_stages=["ingest"] if changed else [])
    create_markdown_artifact(retrain_markdown(changed), key="lmforge-retrain",
                             description="what changed, and what serves now")  # fmt: skip
    return {"retrained": True, "changed": changed, "stages": results}


def retrain_markdown(changed: list[str]) -> str:
    """What the new data changed: per task, its rows and label shares before and after, the champion on
    the old and the new test split, the candidate, the gate's decision and reasons, drift; what serves."""
    lines = [
        "# lmforge retrain",
        "",
        f"New data in: {', '.join(changed) or 'none (forced)'}.",
        "",
        "## What serves now",
        "",
    ]
    reports = promote_reports()
    for report in reports:
        serving = report.champion_after.version if report.champion_after else "nothing"
        lines.append(f"- {report.registered_model}: version {serving} ({report.decision} for v{report.version})")
    lines += ["", "## Each task"]
    for report in reports:
        lines += promotion_markdown(report)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help="serve the cron schedule here (no separate server)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--port", type=int, default=4200, help="port of the server --serve starts (no PREFECT_API_URL)")
    args = parser.parse_args()
    if args.serve:
        # Started in the background by a script (`... &`), a process inherits SIGINT ignored, and Python
        # then never raises KeyboardInterrupt: "Ctrl-C stops it" (or `kill -INT`) must hold anyway.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        cron = stage_params(args.params).orchestrate.retrain_cron
        with prefect_api(args.port) as api_url:
            print(f"serving lmforge-retrain on {api_url} (cron {cron!r}, UTC); Ctrl-C stops it")
            retrain.serve(name="lmforge-retrain", cron=cron, parameters={"params_path": args.params})
    else:
        with ephemeral_api_settings():
            retrain(args.params)


if __name__ == "__main__":
    run_main(main)
