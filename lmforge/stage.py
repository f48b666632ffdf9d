"""What a stage is, and the one command line every stage shares.

A stage is `run(section, paths) -> report`:
- the section: the part of params.yaml it reads, exactly the keys its dvc.yaml entry lists under
  `params:` (`params_keys`, with `{item}` for a foreach stage's key);
- the paths: a frozen dataclass whose fields are the paths its dvc.yaml `cmd` passes, each marked
  as an input (a dvc.yaml dep), an output (an out, metric or plot) or scratch (resume state that
  DVC does not track);
- the report: a pydantic model, written to `report_file(paths)` (a DVC out), where `lmforge status`
  and the Prefect flow's summary read it; stages whose runs people compare (pretrain, finetune,
  evaluate, promote) also write `report.figures()`, a handful of numbers, to `paths.metrics`
  (metrics/...: DVC metrics, committed with git, so `dvc metrics diff` and `dvc exp show` compare them).

`python -m stages.<name>` is `main(STAGE)`: every path is a required option, so dvc.yaml owns them
all, and tests/test_stage_contract.py checks dvc.yaml against these declarations.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from lmforge.artifacts import Artifact
from lmforge.errors import Follower, LmforgeError, TransientError, run_main
from lmforge.io import clear_dead_writers, file_lock, remove, write_json_atomic
from lmforge.params import Params, load_params
from lmforge.tracking import PARAMS_ENV

Role = Literal["in", "out", "scratch", "base"]
# Set while a flow restores a stage that ran on a worker (flows/pipeline.py): DVC runs the command only when
# its run-cache misses, and then the stage must not train a second time here.
RESTORE_ONLY_ENV = "LMFORGE_RESTORE_ONLY"
DVC_STAGE_ENV = "DVC_STAGE"  # set by DVC for a stage's command: the stage it runs (`finetune@sentiment`)

SectionT = TypeVar("SectionT")
PathsT = TypeVar("PathsT")
ReportT = TypeVar("ReportT", bound=Artifact)


def _path(role: Role, help: str) -> Any:
    return dataclasses.field(metadata={"role": role, "help": help})


def dep(help: str) -> Any:
    """An input path: a dvc.yaml dep of the stage."""
    return _path("in", help)


def output(help: str) -> Any:
    """An output path: a dvc.yaml out, metric or plot (or the folder that holds them)."""
    return _path("out", help)


def scratch(help: str) -> Any:
    """Resume state (checkpoints, trial folders): written and read by the stage, not tracked by DVC."""
    return _path("scratch", help)


def base(help: str) -> Any:
    """The folder relative paths in params resolve against (the repository root)."""
    return _path("base", help)


def roles(paths_type: type) -> dict[str, Role]:
    """Each path field's role, by field name."""
    return {field.name: field.metadata["role"] for field in dataclasses.fields(paths_type)}


def item_of(mapping: dict[str, Any], item: str | None, key: str) -> Any:
    """The foreach item's entry of a params mapping, or a one-line error naming the key."""
    if item is None or item not in mapping:
        noun = key.rsplit(".", 1)[-1].removesuffix("s")  # finetune.tasks: task; pretrain.models: model
        raise LmforgeError(f"{key}: no {noun} named {item!r} (have: {', '.join(mapping) or 'none'})")
    return mapping[item]


@dataclass(frozen=True)
class Stage(Generic[SectionT, PathsT, ReportT]):
    """A stage's declaration: what dvc.yaml must say about it, and how to run it."""

    name: str  # the dvc.yaml stage, the module, the params section, the MLflow run and the Prefect task
    params_keys: tuple[str, ...]  # dvc.yaml `params:`; "{item}" is the foreach key
    section: Callable[[Params, str | None], SectionT]  # picks those keys out of the validated params
    paths: type[PathsT]
    run: Callable[[SectionT, PathsT], ReportT]
    summary: Callable[[ReportT, PathsT], str]  # what the command prints when it is done
    report_file: Callable[[PathsT], Path]  # where the report is (a DVC out)
    item: str | None = None  # the option naming a foreach item: "model" or "task"
    write_report: bool = True  # False: run writes it itself (validate: before it fails; evaluate: in its folder)
    # the stages that train: (section, argv) -> whether it started the stage again under torchrun, for
    # several devices (lmforge/distributed.py relaunch); the other stages never import torch for it
    relaunch: Callable[[SectionT, list[str]], bool] | None = None

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"python -m stages.{self.name}", description=self.run.__doc__)
        parser.add_argument("--params", type=Path, required=True, help="the params file (params.yaml)")
        if self.item:
            parser.add_argument(f"--{self.item}", required=True, help=f"the foreach item: which {self.item}")
        for field in dataclasses.fields(self.paths):  # type: ignore[arg-type]
            role = field.metadata["role"]
            parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=Path, required=True,
                                help=f"{field.metadata['help']} ({role})")  # fmt: skip
        return parser

    def paths_from(self, args: argparse.Namespace) -> PathsT:
        """The paths type filled from parsed command-line options."""
        names = [field.name for field in dataclasses.fields(self.paths)]  # type: ignore[arg-type]
        return self.paths(**{name: getattr(args, name) for name in names})

    def write(self, report: ReportT, paths: PathsT) -> None:
        """The report where dvc.yaml puts it (unless run wrote it) and, for a stage with a `metrics`
        path, the few figures a person compares (DVC metrics, committed with git)."""
        if self.write_report:
            report.write(self.report_file(paths))
        if hasattr(paths, "metrics"):
            write_json_atomic(paths.metrics, report.figures())

    def main(self, argv: list[str] | None = None) -> None:
        """`python -m stages.<name> ...`: parse, validate params, run, write the report, print a summary."""
        args = self.parser().parse_args(argv)

        def go() -> None:
            if os.environ.get(RESTORE_ONLY_ENV):
                why = "DVC's run-cache holds no run of it for these inputs, so it would train again here"
                raise LmforgeError(f"{self.name}: ran on a worker, but {why}: not run ({RESTORE_ONLY_ENV})")
            params = load_params(args.params)
            os.environ[PARAMS_ENV] = str(args.params)
            section = self.section(params, getattr(args, self.item) if self.item else None)
            paths = self.paths_from(args)
            address = f"{self.name}@{getattr(args, self.item)}" if self.item else self.name
            with one_writer(address, self.report_file(paths)):
                if self.relaunch and self.relaunch(section, sys.argv[1:] if argv is None else argv):
                    return  # its ranks ran the stage; rank 0 wrote the report and printed the summary
                try:
                    report = self.run(section, paths)
                except Follower:
                    return  # another rank of a multi-device run: rank 0 writes the report
                except BaseException:
                    if os.environ.get(DVC_STAGE_ENV) == address:  # under `dvc repro`, which deleted the outputs
                        restore_missing_outputs(address)
                    raise
                self.write(report, paths)
                print(self.summary(report, paths))

        run_main(go)


def restore_missing_outputs(address: str, root: Path = Path(".")) -> list[Path]:
    """After a failed run of stage `address`, put back each output that DVC deleted before running it, as
    dvc.lock records it (from DVC's cache), so a failed `dvc repro` leaves the previous outputs as a failed
    direct run does; and clear what a killed writer left beside them. Returns what it restored. Outputs
    the failed run wrote itself (validate's reports) stay; on a first run there is nothing to restore."""
    recorded = locked_outputs(address, root)
    for name in recorded:  # a killed writer's .tmp-PID / .old-PID beside an output (DVC would hash its folder)
        clear_dead_writers((root / name).parent, f".{Path(name).name}.[to][ml][pd]-*")
    missing = [name for name in recorded if not (root / name).exists()]
    if not missing:
        return []
    from dvc.api import DVCFileSystem

    restored = []
    try:
        fs = DVCFileSystem(str(root))
        for name in missing:
            path = root / name
            staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            remove(staging)
            fs.get(name, str(staging), recursive=recorded[name])
            os.replace(staging, path)
            restored.append(path)
    except Exception as error:  # the cache lacks it (gc'd, never pulled): the failure stays the stage's own
        print(f"warning: {address}: could not restore its previous outputs from DVC's cache: {error}", file=sys.stderr)
    return restored


def locked_outputs(address: str, root: Path = Path(".")) -> dict[str, bool]:
    """The outputs dvc.lock records for stage `address` in DVC's cache: path -> whether it is a folder.
    (Outputs with `cache: false`, the metrics committed with git, are not in the cache.)"""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    if not (root / "dvc.lock").is_file():
        return {}
    try:
        with Repo(str(root)) as repo:
            stage = next((stage for stage in repo.index.stages if stage.name == address), None)
            outs = [] if stage is None else stage.outs
            return {out.def_path: out.hash_info.isdir for out in outs if out.use_cache and out.hash_info}
    except DvcException:
        return {}


def stage_lock_path(report: Path) -> Path:
    """The lock of the stage run that writes `report`: one per output location on this machine."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(Path(report).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "lmforge-stage-locks" / f"{digest}.lock"


@contextmanager
def one_writer(address: str, report: Path) -> Iterator[None]:
    """Refuse a second run of the same stage on the same outputs while the first runs (a second `dvc repro`
    or `lmforge run` in one workspace: DVC lets go of its lock while a stage's command runs). Transient:
    exit 75, the flow tries again later. The ranks of a multi-device run share their launcher's lock."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    busy = TransientError(f"{address}: another run of it is writing {report} in this workspace; not run "
                          "twice at once (try again when it ends)")  # fmt: skip
    with file_lock(stage_lock_path(report), 0, busy):
        yield


def stage_of(name: str) -> Stage[Any, Any, Any]:
    """The declaration of stage `name` (lmforge/<name>.py's STAGE)."""
    stage: Stage[Any, Any, Any] = importlib.import_module(f"lmforge.{name}").STAGE
    return stage


def dvc_commands(repo_root: Path = Path(".")) -> dict[str, str]:
    """Every stage of dvc.yaml (foreach items resolved, `finetune@sentiment`) -> its command, in DAG order."""
    return {name: command for name, (command, _) in dvc_stages(repo_root).items()}


def dvc_stages(repo_root: Path = Path(".")) -> dict[str, tuple[str, list[str]]]:
    """Every stage of dvc.yaml -> (its command, the stages whose outputs it reads), in DAG order."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from scmrepo.exceptions import SCMError

    try:
        with Repo(str(repo_root)) as repo:
            if Path(repo.root_dir).resolve() != Path(repo_root).resolve():  # dvc.yaml's paths are the root's
                raise LmforgeError(f"{Path(repo_root).resolve()}: run lmforge in the repository root, {repo.root_dir}")
            graph = repo.index.graph  # edges point from a stage to the stages it depends on
            return {stage.name: (stage.cmd, sorted(upstream.name for upstream in graph.successors(stage)))
                    for stage in reversed(list(nx.topological_sort(graph)))}  # fmt: skip
    except (DvcException, SCMError) as error:
        raise LmforgeError(f"{Path(repo_root).resolve()}: cannot read dvc.yaml's stages (run lmforge in the "
                           f"repository root): {' '.join(str(error).split())[:200]}") from None  # fmt: skip


def parse_command(address: str, command: str) -> tuple[Stage[Any, Any, Any], argparse.Namespace, Any]:
    """dvc.yaml's command of a stage, read by the stage's own parser: (stage, arguments, paths)."""
    name = address.split("@")[0]
    stage = stage_of(name)
    words = shlex.split(command)
    if words[:3] != ["python", "-m", f"stages.{name}"]:
        raise LmforgeError(f"dvc.yaml: stage {address}: cmd must start with `python -m stages.{name}`")
    args = stage.parser().parse_args(words[3:])
    return stage, args, stage.paths_from(args)


def dvc_paths(address: str, repo_root: Path = Path(".")) -> Any:
    """The paths dvc.yaml gives stage `address` (e.g. `promote@sentiment`): dvc.yaml owns every path."""
    commands = dvc_commands(repo_root)
    if address not in commands:
        raise LmforgeError(f"dvc.yaml: no stage {address!r} (have: {', '.join(commands)})")
    return parse_command(address, commands[address])[2]


def report_files(repo_root: Path = Path(".")) -> dict[str, tuple[Stage[Any, Any, Any], Path]]:
    """Each stage's report as dvc.yaml places it, by stage address, in DAG order (it may not exist yet)."""
    found = {}
    for address, command in dvc_commands(repo_root).items():
        stage, _, paths = parse_command(address, command)
        found[address] = (stage, repo_root / stage.report_file(paths))
    return found
