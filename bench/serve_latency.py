"""Serving latency of each task's @champion: `mlflow models serve` over HTTP beside the pyfunc in process.

After `make run` (or `dvc repro`), each task of params.yaml has a registered `@champion`. For each, this
starts `mlflow models serve -m models:/<prefix>-<task>@champion --env-manager local` on loopback and
times one-text requests to /invocations, interleaved with the same texts given to the same model loaded
in this process (`lmforge predict`'s way), so both columns come from one run on one machine. The
difference is what HTTP, JSON and the scoring server add to a request.

    python -m bench.serve_latency [--requests 100] [--params params.yaml]

Prints a table and writes bench/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from bench.machine import describe
from lmforge import registry
from lmforge.params import load_params
from lmforge.predict import generation_params, served_model

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve(model_uri: str, port: int) -> subprocess.Popen[bytes]:
    """`mlflow models serve` as a user starts it from the activated environment (MLflow execs uvicorn from PATH)."""
    bin_dir = str(Path(sys.executable).parent)
    command = [f"{bin_dir}/mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
               "-p", str(port)]  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mlflow models serve {model_uri} exited {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"mlflow models serve {model_uri} did not answer /ping in 300 s")


def percentiles(milliseconds: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(milliseconds, 50)), "p95_ms": float(np.percentile(milliseconds, 95))}


def time_task(prefix: str, task: str, texts: list[str], max_new_tokens: int) -> dict[str, Any]:
    model_uri, model = served_model(prefix, task, None)
    request_params = generation_params(model, max_new_tokens)
    port = free_port()
    server = serve(f"models:/{registry.model_name(prefix, task)}@champion", port)
    http, in_process = [], []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for text in texts[:3]:  # warm-up: the first calls pay lazy imports on both sides
                client.post("/invocations", json={"dataframe_records": [{"text": text}]})
                model.predict(pd.DataFrame({"text": [text]}), params=request_params)
            for text in texts:
                body: dict[str, Any] = {"dataframe_records": [{"text": text}]}
                if request_params:
                    body["params"] = request_params
                started = time.perf_counter()
                response = client.post("/invocations", json=body)
                http.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
                started = time.perf_counter()
                model.predict(pd.DataFrame({"text": [text]}), params=request_params)
                in_process.append((time.perf_counter() - started) * 1000)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"task": task, "model_uri": model_uri, "requests": len(texts), "http": percentiles(http),
            "in_process": percentiles(in_process)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    rows = []
    for task, spec in params.finetune.tasks.items():
        test = pd.read_parquet(Path("data/raw") / spec.dataset / "test.parquet", columns=["text"])
        texts = test["text"].astype(str).head(args.requests).tolist()
        if spec.kind == "generation":  # a prompt, as a user sends one: the text's first prompt_chars characters
            texts = [text[: spec.prompt_chars] for text in texts]
        rows.append(time_task(params.promote.model_prefix, task, texts, params.evaluate.max_new_tokens))
    print(f"{'task':<14} {'served model':<36} {'HTTP p50':>9} {'p95':>7} {'in-process p50':>15} {'p95':>7}")
    for row in rows:
        print(f"{row['task']:<14} {row['model_uri']:<36} {row['http']['p50_ms']:>9.1f} {row['http']['p95_ms']:>7.1f} "
              f"{row['in_process']['p50_ms']:>15.1f} {row['in_process']['p95_ms']:>7.1f}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_latency.json").write_text(json.dumps({"machine": describe(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
