"""Shared fixtures: the smoke profile, a stage runner, and one smoke run of the data stages."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lmforge.params import Params, profile_params
from lmforge.stage import dvc_commands, parse_command, roles, stage_of

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real MLflow store (SQLite) for the whole session; stages run in subprocesses inherit it."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def smoke_params() -> Params:
    return profile_params("smoke")


def run_stage(stage: str, *args: str | Path, cwd: Path = REPO, env: dict[str, str] | None = None):
    """Run `python -m stages.<stage>` as a user would, and return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=600,
    )


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path: 'left intact' means this is unchanged."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@functools.cache
def _commands() -> dict[str, str]:
    return dvc_commands(REPO)


def paths_for(address: str, root: Path) -> Any:
    """The paths dvc.yaml gives stage `address` (e.g. `finetune@sentiment`), moved under `root`."""
    _, _, paths = parse_command(address, _commands()[address])
    moved = {name: REPO if role == "base" else root / getattr(paths, name) for name, role in roles(type(paths)).items()}
    return dataclasses.replace(paths, **moved)


def run_in(address: str, params: Params, under: Path, like: str | None = None, **paths_overrides: Path) -> Any:
    """Run a stage's core in this process as its command would, on dvc.yaml's layout under `under`.

    `like` borrows the paths of another stage of dvc.yaml (for an item dvc.yaml does not list).
    """
    name, _, item = address.partition("@")
    stage = stage_of(name)
    paths = dataclasses.replace(paths_for(like or address, under), **paths_overrides)
    report = stage.run(stage.section(params, item or None), paths)
    stage.write(report, paths)
    return report


@dataclass(frozen=True)
class SmokeRun:
    root: Path
    raw: Path
    validation: Path
    processed: Path
    params: Params


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, smoke_params: Params) -> SmokeRun:
    """ingest -> validate -> preprocess on the bundled corpora with the smoke profile, in-process."""
    root = tmp_path_factory.mktemp("smoke")
    for stage in ("ingest", "validate", "preprocess"):
        run_in(stage, smoke_params, root)
    return SmokeRun(root, root / "data/raw", root / "reports/validation", root / "data/processed", smoke_params)


@pytest.fixture(scope="session")
def smoke_models(smoke_run: SmokeRun) -> SmokeRun:
    """The smoke run, plus its pretrained encoder and decoder and its three fine-tuned task models."""
    for name in smoke_run.params.pretrain.models:
        run_in(f"pretrain@{name}", smoke_run.params, smoke_run.root)
    for task in smoke_run.params.finetune.tasks:
        run_in(f"finetune@{task}", smoke_run.params, smoke_run.root)
    return smoke_run


@pytest.fixture(scope="session")
def smoke_evaluated(smoke_models: SmokeRun) -> SmokeRun:
    """The smoke models, each scored on its test split (reports/evaluate/<task>) and logged to MLflow."""
    for task in smoke_models.params.finetune.tasks:
        run_in(f"evaluate@{task}", smoke_models.params, smoke_models.root)
    return smoke_models


def sh(*args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with this environment's tools first on PATH (dvc, python)."""
    base = os.environ if env is None else env
    env = {**base, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def clone_working_tree(root: Path, profile: str = "smoke") -> Path:
    """Tracked and untracked-but-not-ignored files of this working tree, committed in a fresh git repo."""
    import shutil

    listed = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    sh("git", "init", "-q", "-b", "main", cwd=root)
    sh(sys.executable, "-m", "lmforge.cli", "params", "use", profile, cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone", cwd=root)
    return root


@pytest.fixture
def postgres_databases():
    """Makes fresh databases on the PostgreSQL that runs on loopback here; all dropped afterwards."""
    import uuid

    import psycopg2

    connection = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    connection.autocommit = True
    names: list[str] = []

    def new_database() -> str:
        names.append(f"lmforge_test_{uuid.uuid4().hex[:8]}")
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {names[-1]}")
        return f"postgresql://postgres@127.0.0.1:5432/{names[-1]}"

    try:
        yield new_database
    finally:
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        connection.close()


@pytest.fixture
def postgres_url(postgres_databases) -> str:
    """A fresh database on the PostgreSQL that runs on loopback here; dropped afterwards."""
    return postgres_databases()
