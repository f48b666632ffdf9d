"""Routed stages: what dispatching a stage to a worker costs, and what two workers side by side give.

On a clone of this repository's HEAD (the `smoke` profile: small models, so the fixed costs show),
with a Prefect server, an MLflow server, a DVC folder remote and process workers on one `local` pool,
all started here, it times the two pretrain stages (pretrain@encoder, pretrain@decoder) five ways,
interleaved, each on a new `pretrain.seed` (a new commit) so that every one of them trains:

- `dvc repro`: each stage with `dvc repro --single-item`, one after the other (no Prefect);
- flow, nothing routed: the pipeline flow's own path (`orchestrate.pools` empty), as `lmforge run`;
- flow, routed, 2 workers: both stages routed to the pool, run side by side on two workers;
- one stage: pretrain@decoder alone, by `dvc repro` and routed; the difference is the dispatch
  overhead of one routed stage (the worker's fresh checkout, pull, push and the flow's restore).

    python -m bench.dispatch [--repeats 2] [--workers 2]

Prints a table and writes bench/results/dispatch.json. On one machine the workers share its cores:
side by side is faster only where the stages leave cores idle; on separate GPU machines each has its own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from bench.machine import describe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STAGES = ("pretrain@encoder", "pretrain@decoder")


def sh(*command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-800:]}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def workspace(root: Path, env: dict[str, str]) -> Path:
    """A clone of HEAD on the smoke profile with a DVC folder remote, its upstream stages done."""
    repo = root / "repo"
    sh("git", "clone", "-q", str(ROOT), str(repo), cwd=root)
    sh(sys.executable, "-m", "lmforge.cli", "params", "use", "smoke", cwd=repo, env=env)
    sh("dvc", "remote", "add", "-d", "store", str(root / "remote"), cwd=repo, env=env)
    commit(repo, "smoke profile, a DVC remote")
    sh("dvc", "repro", "preprocess", cwd=repo, env=env)
    return repo


def commit(repo: Path, message: str) -> None:
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", message, cwd=repo)


def new_seed(repo: Path, seed: int) -> None:
    """A new pretrain.seed, committed: the pretrain stages must train again (a routed stage needs a commit)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["seed"] = seed
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    commit(repo, f"pretrain.seed {seed}")


def background(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as output:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass


@contextmanager
def servers_and_workers(root: Path, repo: Path, env: dict[str, str], workers: int) -> Iterator[str]:
    """A Prefect server (PREFECT_API_URL set while the block runs), an MLflow server, the `local` pool with
    its stage deployment, and `workers` process workers; yields the tracking URI."""
    from flows.server import prefect_api, wait_until_healthy

    started: list[subprocess.Popen] = []
    with prefect_api(port=free_port()) as api_url:
        try:
            env.update(PREFECT_API_URL=api_url, PREFECT_WORKER_QUERY_SECONDS="2")
            tracking_uri = f"http://127.0.0.1:{free_port()}"
            tracking = background([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                   f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
                                   (root / "artifacts").as_uri(), "--port", tracking_uri.rsplit(":", 1)[1],
                                   "--workers", "1"], root, env, root / "mlflow.log")  # fmt: skip
            started.append(tracking)
            sh(sys.executable, "-m", "prefect", "work-pool", "create", "local", "--type", "process", cwd=repo, env=env)
            sh(sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "local", cwd=repo, env=env)
            for index in range(workers):
                started.append(background([sys.executable, "-m", "prefect", "worker", "start", "--pool", "local",
                                           "--limit", "1"], repo, env, root / f"worker-{index}.log"))  # fmt: skip
            wait_until_healthy(tracking_uri, tracking, root / "mlflow.log", timeout_s=120)
            yield tracking_uri
        finally:
            for process in reversed(started):
                stop(process)


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def flow_run(repo: Path, stages: tuple[str, ...], pools: dict[str, str], env: dict[str, str]) -> list[dict[str, Any]]:
    """The pipeline flow's DAG walk (flows/pipeline.py run_dag) over `stages`, as one flow run."""
    from prefect import flow

    from flows.pipeline import run_dag
    from lmforge.params import load_params
    from lmforge.stage import dvc_stages

    settings = load_params(repo / "params.yaml").orchestrate.model_copy(update={"pools": pools})
    chosen = {name: entry for name, entry in dvc_stages(repo).items() if name in stages}

    @flow(name="bench-dispatch")
    def walk() -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        run_dag(chosen, settings, env, [], results)
        return results

    state = walk(return_state=True)
    if not state.is_completed():
        raise SystemExit(f"the flow run failed: {state.message}")
    results: list[dict[str, Any]] = state.result()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lmforge-dispatch-"))
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(root / "prefect"), LMFORGE_HOME=str(root / "repo"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    repo = workspace(root, env)
    os.chdir(repo)
    timings: dict[str, list[float]] = {}
    seed = 100
    with servers_and_workers(root, repo, env, args.workers) as tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
        routed = {"pretrain": "local"}

        def repro(stages: tuple[str, ...]) -> None:
            for stage in stages:
                sh("dvc", "repro", "--single-item", stage, cwd=repo, env=env)

        ways: dict[str, Callable[[], object]] = {
            "dvc repro, 2 stages": lambda: repro(STAGES),
            "flow, nothing routed, 2 stages": lambda: flow_run(repo, STAGES, {}, env),
            f"flow, routed, {args.workers} workers, 2 stages": lambda: flow_run(repo, STAGES, routed, env),
            "dvc repro, 1 stage": lambda: repro(STAGES[1:]),
            "flow, routed, 1 stage": lambda: flow_run(repo, STAGES[1:], routed, env),
        }
        for _ in range(args.repeats):
            for name, work in ways.items():
                seed += 1
                new_seed(repo, seed)
                timings.setdefault(name, []).append(round(timed(work), 2))
                print(f"{name}: {timings[name][-1]:.1f} s", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in timings.items()}
    names = list(ways)
    summary = {
        "dispatch_overhead_seconds": round(median[names[4]] - median[names[3]], 1),
        "flow_nothing_routed_vs_dvc_repro": round(median[names[1]] / median[names[0]], 2),
        "routed_side_by_side_vs_dvc_repro": round(median[names[2]] / median[names[0]], 2),
    }
    rows = [{"way": name, "seconds": median[name], "runs": timings[name]} for name in names]
    print(f"{'way':<40} {'median s':>9}")
    for row in rows:
        print(f"{row['way']:<40} {row['seconds']:>9.1f}")
    for key, value in summary.items():
        print(f"{key}: {value}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dispatch.json").write_text(json.dumps({"machine": describe(), "profile": "smoke", "rows": rows,
                                                       **summary}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
