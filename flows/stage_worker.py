"""A DVC stage as a Prefect flow run on a work pool: how a training stage (or a trial worker) reaches a GPU worker.

In Prefect only flow runs go to work pools, so a stage routed to a pool (`orchestrate.pools`, e.g.
`{pretrain: gpu}`) runs as a flow run of the deployment `lmforge-stage/<pool>` (prefect.yaml), and
whatever worker serves that pool (a process worker on a GPU machine, a Docker or Kubernetes worker)
runs `stage_worker` below:

1. a fresh checkout of the parent's git commit (not the worker's own working tree), in a folder of
   its own for this stage and commit (under `LMFORGE_STAGE_WORKDIR`, else the temp folder);
2. `dvc repro --pull --allow-missing --single-item <stage>`: the stage's inputs come from the DVC
   remote, the stage runs;
3. `dvc push --run-cache <stage>`: its outputs and its run-cache entry go back to the remote.

The folder is removed once the stage has run; after a failure it stays, so the retry of a stage
killed mid-training, on the same worker (or one sharing LMFORGE_STAGE_WORKDIR), resumes from its
checkpoints there instead of starting over.

The optimize stage's trial workers are flow runs of the same deployment (`optimize.worker_pool`): each
checks out the commit and pulls the stage's inputs the same way, then trains trials of the stage's
Optuna study (flows/trials.py starts them).

It returns only small JSON (the stage, its output hashes, seconds): models and data travel through
the DVC remote, never through Prefect results. The parent (flows/pipeline.py) then restores the
stage in its own workspace from the run-cache (`dvc repro --pull` finds it cached), so its dvc.lock
ends as a local `dvc repro` of the same commit would write it.
"""

from __future__ import annotations

import contextvars
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock
from prefect import flow, get_run_logger

from lmforge import tracking
from lmforge.credentials import masked
from lmforge.progress import PROGRESS_ENV, Progress
from lmforge.stage import restore_missing_outputs

STAGE_FLOW = "lmforge-stage"  # deployments are lmforge-stage/<pool>: one per work pool
SKIPPED = "didn't change, skipping"  # what `dvc repro` prints for a stage it did not run
# The environment a worker's stage inherits from the parent: where runs are tracked and nested. Nothing
# secret: credentials (LMFORGE_OPTUNA_STORAGE, LMFORGE_LOCK_URL, MLFLOW_TRACKING_PASSWORD) are the worker's own.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, tracking.FLOW_RUN_ENV)
GIT_REMOTE_ENV = "LMFORGE_GIT_REMOTE"  # orchestrate.git_remote, for the stages a flow runs (their trial workers)


class StageFailed(RuntimeError):
    """A stage's command failed; `code` is its exit code (2 and 3 are the user's to fix, not retried)."""

    def __init__(self, stage: str, code: int, message: str) -> None:
        super().__init__(f"stage {stage} failed (exit {code}): {masked(message)}")
        self.stage, self.code = stage, code

    @classmethod
    def from_message(cls, stage: str, message: str) -> StageFailed:
        """The failure a child flow run reported, or a transient one (75) when it said no exit code
        (a crashed or cancelled run: the worker was lost)."""
        found = re.search(r"stage \S+ failed \(exit (-?\d+)\): (.*)", message or "")
        if found is None:
            return cls(stage, 75, f"its flow run ended without a result: {message or 'no message'}")
        return cls(stage, int(found.group(1)), found.group(2))


def last_error_line(stderr: str) -> str:
    """The stage's own one-line error; for a crash, the traceback's last line rather than DVC's wrapper."""
    lines = [line for line in re.split(r"[\r\n]+", stderr.strip()) if line.strip()]  # \r: progress bars
    errors = [line for line in lines if line.startswith("error:")]
    own = [line for line in lines if not line.startswith("ERROR: failed to reproduce")]
    return (errors or own or lines or ["(no output)"])[-1]


def stage_exit_code(result: subprocess.CompletedProcess) -> int:
    """DVC exits 255 when a stage command fails; the stage's own code is in its message
    (`ERROR: failed to reproduce 'validate': failed to run: ..., exited with 3`). A failure of DVC's own
    (a remote it cannot reach, a lock it cannot take) counts as transient: 75."""
    found = re.findall(r"exited with (-?\d+)", result.stderr)
    if found:
        return int(found[-1])
    return 75 if result.returncode == 255 else result.returncode


def end_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End a command's whole process group (dvc, the stage, anything it started): SIGTERM, then SIGKILL."""
    for sent in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sent)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            os.killpg(process.pid, 0)  # the leader is gone; is anyone of its group left?
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def logger() -> Any:
    """The flow run's logger, or the module's outside a flow run."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(__name__)


# A progress bar's redraw (tqdm: "desc:  42%|████  | 420/1000 [00:01<00:02, 5.00step/s, loss=0.1]"): a terminal's,
# not a log's. tqdm writes a carriage return before a redraw and none after, so a line printed while a bar is
# shown arrives glued to the bar's last redraw: the redraw is cut off and the rest kept.
BAR_REDRAW = re.compile(r"^.*?\d+%\|[^|]*\|[^\[\]]*(\[[^\]]*\])?")
READERS_GRACE_S = 30.0  # after the stage's process ends, for whatever it started to let go of its output
PUBLISH_EVERY_S = 2.0  # progress artifact updates at most this often: each is a call to the Prefect API


class Relay:
    """A running stage's output, a line as it comes: into the flow run's log (progress bars left out), its
    progress lines (lmforge/progress.py) into the stage's progress artifact; all of it kept for the result."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.artifact: Any = None  # the progress artifact's id, from the first progress line on
        self.last: Progress | None = None  # the latest progress line
        self.published_at = 0.0
        self.context = contextvars.copy_context()  # the flow run's: the reader threads log into it

    def follow(self, process: subprocess.Popen, timeout_s: float | None) -> tuple[str, str]:
        """Both streams until the process ends (TimeoutExpired past `timeout_s`); (stdout, stderr)."""
        kept: dict[str, list[str]] = {"stdout": [], "stderr": []}
        readers = [threading.Thread(target=self.context.copy().run, args=(self.read, stream, kept[name]), daemon=True)
                   for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))]  # fmt: skip
        for reader in readers:
            reader.start()
        process.wait(timeout=timeout_s)
        deadline = time.monotonic() + READERS_GRACE_S
        for reader in readers:
            reader.join(timeout=max(deadline - time.monotonic(), 0.0))
        if any(reader.is_alive() for reader in readers):  # something the stage started still holds its output
            end_group(process)
            for reader in readers:
                reader.join(timeout=5.0)
        if process.returncode == 0 and self.last is not None:  # done, early stopping included: the bar is full
            self.publish(self.last, 100.0, done=True)
        return "".join(kept["stdout"]), "".join(kept["stderr"])

    def read(self, stream: Any, kept: list[str]) -> None:
        for line in stream:  # text mode: a carriage return ends a line too, so each redraw is one
            kept.append(line)
            try:
                self.show(line.rstrip())
            except Exception as error:  # the pipe must be drained whatever happens: a full pipe stalls the stage
                kept.append(f"(lmforge: a line was not relayed: {type(error).__name__})\n")

    def show(self, line: str) -> None:
        found = Progress.parse(line)  # first: it may come glued to a bar's redraw
        if found is not None:
            self.last = found
            if time.monotonic() - self.published_at >= PUBLISH_EVERY_S:
                self.publish(found, found.percent)
            return
        text = BAR_REDRAW.sub("", line).strip()
        if text:
            logger().info(masked(text))

    def publish(self, found: Progress, percent: float, done: bool = False) -> None:
        """The stage's progress artifact in the Prefect UI (inside a flow run only): created, then updated."""
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        self.published_at = time.monotonic()
        try:
            if self.artifact is None:
                key = "progress-" + re.sub(r"[^a-z0-9]+", "-", self.stage.lower()).strip("-")
                self.artifact = create_progress_artifact(percent, key=key, description=found.markdown(done))
            else:
                update_progress_artifact(self.artifact, percent, description=found.markdown(done))
        except Exception as error:  # a progress picture is not worth failing a stage for
            logger().debug(f"progress artifact of {self.stage}: {type(error).__name__}: {error}")


def dvc(stage: str, arguments: list[str], cwd: Path, env: dict[str, str],
        timeout_s: float | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """One dvc command for `stage`; its failure is the stage's, with the stage's own exit code.

    The command runs in a process group of its own, which is ended as a whole when it runs past
    `timeout_s`, when this call is interrupted (a cancelled flow run), or when this process dies
    (lmforge/processes.py): no stage trains on unseen behind its retry.
    """
    # Other stages of the flow may hold this repository's DVC lock for a moment: wait for it, do not fail.
    # lmforge.processes leads the new process group: it ends the group if this process dies or ends it.
    command = [sys.executable, "-m", "lmforge.processes", "dvc", "--wait-for-lock", *arguments]
    # Unbuffered: a stage's stdout reaches the log as it prints, not when the pipe's buffer fills or it exits.
    process = subprocess.Popen(command, cwd=cwd, env={**env, PROGRESS_ENV: "lines", "PYTHONUNBUFFERED": "1"},
                               encoding="utf-8", errors="replace", bufsize=1, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    relay = Relay(stage)
    try:
        stdout, stderr = relay.follow(process, timeout_s)
    except subprocess.TimeoutExpired:
        end_group(process)
        restore_after(stage, arguments, cwd)
        why = f"ran past its timeout of {timeout_s:g}s (orchestrate.timeouts_s): its processes were ended"
        raise StageFailed(stage, -signal.SIGTERM, why) from None
    except BaseException:
        end_group(process)
        restore_after(stage, arguments, cwd)
        raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if result.returncode != 0:  # its lines are in the log already, as they came
        code = stage_exit_code(result)
        if code < 0:  # killed by a signal: it printed nothing of its own, nor put back its outputs
            restore_after(stage, arguments, cwd)
            name = signal.Signals(-code).name if -code in {int(known) for known in signal.Signals} else -code
            raise StageFailed(stage, code, f"its process was killed by {name}")
        raise StageFailed(stage, code, last_error_line(result.stderr))
    return result


def restore_after(stage: str, arguments: list[str], cwd: Path) -> None:
    """After a `dvc repro` of `stage` that was killed, ran past its timeout or was interrupted, its previous
    outputs back from DVC's cache: a stage that fails of itself puts them back on its own way out."""
    if arguments[:1] == ["repro"] and "--dry" not in arguments:
        restore_missing_outputs(stage, cwd)


def checkout(repo: str, commit: str, folder: Path) -> None:
    """A fresh working tree of `commit` from the git repository `repo` (a path or URL)."""
    for command in (["git", "clone", "--quiet", "--no-checkout", repo, str(folder)],
                    ["git", "-C", str(folder), "checkout", "--quiet", commit]):  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:  # unreachable repository or an unpushed commit: the user's to fix
            where = f"{' '.join(command[:3])} {repo}@{commit}"
            raise StageFailed("checkout", 2, f"{where}: {last_error_line(result.stderr)}")


WORKDIR_ENV = "LMFORGE_STAGE_WORKDIR"


def stage_folder(stage: str, commit: str) -> Path:
    """Where the worker runs `stage` of `commit`: the same folder for a retry, so it finds the checkpoints."""
    root = Path(os.environ.get(WORKDIR_ENV) or Path(tempfile.gettempdir()) / "lmforge-stages")
    return root / f"{re.sub(r'[^A-Za-z0-9_.-]', '-', stage)}-{commit[:12]}"


def reuse_or_checkout(repo: str, commit: str, folder: Path) -> Path:
    """The checkout in `folder` (an earlier attempt's, with its checkpoints), reset to `commit`; else a new one."""
    home = folder / "checkout"
    if (home / ".git").is_dir():
        reset = subprocess.run(["git", "-C", str(home), "checkout", "--quiet", "--force", commit],
                               capture_output=True, text=True)  # fmt: skip
        if reset.returncode == 0:
            return home
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    checkout(repo, commit, home)
    return home


@contextmanager
def checked_out(folder: Path, repo: str, commit: str, lock: str | None) -> Iterator[Path]:
    """The checkout of `commit` in `folder` (reused from an earlier attempt), with the parent's dvc.lock `lock`
    (the hashes of the upstream outputs, which the commit's own may not hold yet); one attempt at a time in it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        home = reuse_or_checkout(repo, commit, folder)
        if lock is not None:
            (home / "dvc.lock").write_text(lock)
        yield home


def push_uncached_outputs(home: Path, stage: str) -> None:
    """DVC's run-cache restores a stage's uncached outputs (its metrics file) from the cache too, and its
    run committed them there, but `dvc push --run-cache` sends only the cached ones: send these as well."""
    from dvc.repo import Repo

    with Repo(str(home)) as repo:
        found = [entry for entry in repo.index.stages if entry.name == stage]
        objects = [out.hash_info for entry in found for out in entry.outs if not out.use_cache and out.hash_info]
        if objects:
            repo.cloud.push(objects)


RUN_WRITTEN = ("dvc.lock", ".gitignore")


def committed_head(stage: str, key: str = "orchestrate.pools") -> str:
    """The commit a worker checks out, after checking the working tree holds nothing it would miss
    (`key` is the params key that sends work to a worker)."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    paths = [line[3:] for line in status.stdout.splitlines()]
    # What DVC and the stages write into tracked files: the worker does not need them.
    dirty = [path for path in paths if not path.startswith("metrics/") and Path(path).name not in RUN_WRITTEN]
    if dirty:
        raise StageFailed(stage, 2, f"{key} sends it to a worker, which checks out this commit: commit "
                                    f"{', '.join(dirty[:5])} first")  # fmt: skip
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def upstream_stages(stage: str, home: Path) -> list[str]:
    """The stages whose outputs `stage` reads (dvc.yaml's DAG, as DVC builds it)."""
    from lmforge.stage import dvc_stages

    return dvc_stages(home)[stage][1]


def train_trials(trials: dict[str, Any], home: Path, env: dict[str, str]) -> list[int]:
    """Trial worker `trials["worker"]` of the optimize stage's study, in the checkout `home`: it joins the
    study (LMFORGE_OPTUNA_STORAGE, the worker's own) and the study's MLflow run, and trains trials until
    the study has n_trials. Each trial's model is logged to its MLflow run, where the stage fetches the best."""
    from lmforge.optimize import OptimizePaths, OptimizeSection, worker_main

    section = OptimizeSection.model_validate(trials["section"])
    paths = OptimizePaths(**{name: home / value for name, value in trials["paths"].items()})
    os.environ.update({key: env[key] for key in FORWARDED_ENV if key in env})  # this flow run's process only
    return worker_main(section, paths, str(trials["study_run_id"]), log_models=True)


def lock_outs(lock: Path, stage: str) -> dict[str, str]:
    """The hashes dvc.lock records for the stage's outputs, by path."""
    entry = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {})
    return {out["path"]: str(out.get("md5", "")) for out in entry.get("outs", [])}


@flow(name=STAGE_FLOW, log_prints=True)
def stage_worker(stage: str, repo: str, commit: str, lock: str | None = None, env: dict[str, str] | None = None,
                 force: bool = False, trials: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run one dvc.yaml stage in a fresh checkout of `commit`, its data from and to the DVC remote; or, with
    `trials`, one trial worker of that (optimize) stage, its inputs from the DVC remote.

    `lock` is the parent's dvc.lock: the hashes of the upstream outputs this stage reads, which the
    commit's own dvc.lock (if it has one) may not hold yet.
    """
    started = time.perf_counter()
    child_env = {**os.environ, **(env or {}),
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    if trials is not None:
        return trial_worker(stage, repo, commit, lock, child_env, trials, started)
    folder = stage_folder(stage, commit)
    with checked_out(folder, repo, commit, lock) as home:
        repro = dvc(stage, ["repro", "--pull", "--allow-missing", "--single-item", *(["--force"] if force else []),
                            stage], home, child_env)  # fmt: skip
        dvc(stage, ["push", "--run-cache", stage], home, child_env)
        push_uncached_outputs(home, stage)
        outs = lock_outs(home / "dvc.lock", stage)
        shutil.rmtree(folder)  # pushed: nothing here is needed any more
    status = "skipped (unchanged)" if SKIPPED in repro.stdout else "ran"
    seconds = round(time.perf_counter() - started, 1)
    print(f"{stage}: {status} in {seconds}s at commit {commit[:12]}; outputs pushed: {outs}")
    return {"stage": stage, "status": status, "seconds": seconds, "outs": outs}


def trial_worker(stage: str, repo: str, commit: str, lock: str | None, env: dict[str, str], trials: dict[str, Any],
                 started: float) -> dict[str, Any]:  # fmt: skip
    """One trial worker of `stage` (optimize@<task>): a checkout of `commit` of its own, the stage's inputs (the
    outputs of the stages it reads) pulled from the DVC remote, then trials until the study has n_trials."""
    folder = stage_folder(f"{stage}.trials-{trials['worker']}", commit)
    with checked_out(folder, repo, commit, lock) as home:
        dvc(stage, ["pull", "--allow-missing", *upstream_stages(stage, home)], home, env)
        trained = train_trials(trials, home, env)
        shutil.rmtree(folder)  # the trials' models are on their MLflow runs
    seconds = round(time.perf_counter() - started, 1)
    print(f"{stage}: trial worker {trials['worker']} trained trials {trained} in {seconds}s at commit {commit[:12]}")
    return {"stage": stage, "status": f"trained {len(trained)} trial(s)", "seconds": seconds, "trials": trained}
