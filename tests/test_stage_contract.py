"""dvc.yaml against the stages' own declarations (lmforge/<name>.py's STAGE), in the spirit of LitGPT's
config-hub test: every command, dep, out and params key of every stage is what the code reads and writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.params import load_params
from lmforge.schema import STAGES
from lmforge.stage import parse_command, roles
from tests.conftest import REPO

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def resolved_stages() -> list[Any]:
    """dvc.yaml's stages with foreach items and ${...} resolved by DVC itself (against params.yaml)."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return list(repo.index.stages)


RESOLVED = resolved_stages()


def test_the_stages_are_the_schema_stages_in_order():
    assert tuple(DVC_YAML) == STAGES
    assert all((REPO / "stages" / f"{name}.py").is_file() and (REPO / "lmforge" / f"{name}.py").is_file()
               for name in STAGES)  # fmt: skip


@pytest.mark.parametrize("name", STAGES)
def test_params_keys_are_exactly_what_the_stage_declares(name: str):
    from lmforge.stage import stage_of

    entry = DVC_YAML[name].get("do", DVC_YAML[name])
    declared = [key.replace("{item}", "${key}") for key in stage_of(name).params_keys]
    assert entry["params"] == declared


@pytest.mark.parametrize("stage", RESOLVED, ids=lambda stage: stage.addressing)
def test_command_deps_and_outs_match_the_paths_type(stage: Any):
    declaration, args, paths = parse_command(stage.addressing, stage.cmd)  # argparse: every option known, none missing
    item = stage.addressing.partition("@")[2] or None
    if declaration.item:
        assert getattr(args, declaration.item) == item
    values = {name: Path(getattr(paths, name)) for name in roles(type(paths))}
    by_role: dict[str, set[Path]] = {}
    for name, role in roles(type(paths)).items():
        by_role.setdefault(role, set()).add(values[name])

    from dvc.dependency.param import ParamsDependency

    files = [dep for dep in stage.deps if not isinstance(dep, ParamsDependency)]
    data_deps = {Path(dep.def_path) for dep in files if not dep.def_path.endswith(".py")
                 and not dep.def_path.startswith(("lmforge/", "stages/"))}  # fmt: skip
    if declaration.name == "ingest":  # local sources are params paths under the base: users put them here
        data_deps.discard(Path("data/external"))
    assert data_deps == by_role.get("in", set()), "data deps must be the paths read, no more, no less"
    code_deps = {dep.def_path for dep in files} - {str(path) for path in data_deps}
    assert {f"stages/{declaration.name}.py", f"lmforge/{declaration.name}.py"} <= code_deps

    declared_outputs = {Path(out.def_path) for out in stage.outs}  # outs, metrics and plots
    output_fields = by_role.get("out", set())
    for out in declared_outputs:
        assert any(out == field or field in out.parents for field in output_fields), f"{out}: no paths field"
    for field in output_fields:
        assert any(out == field or field in out.parents for out in declared_outputs), f"{field}: not an out"
    for scratch in by_role.get("scratch", set()):
        assert scratch.parts[0] == "checkpoints" and scratch not in declared_outputs | data_deps
    assert by_role.get("base", {Path(".")}) == {Path(".")}

    report = Path(declaration.report_file(paths))
    assert report.parts[0] == "reports" and report in declared_outputs, "the report is an out under reports/"
    metrics = {Path(out.def_path) for out in stage.outs if out.metric}
    if declaration.name in ("pretrain", "finetune", "evaluate", "promote"):  # the runs people compare
        assert metrics == {Path(paths.metrics)} and paths.metrics.parts[0] == "metrics"
        assert all(not out.use_cache for out in stage.outs if out.metric), "metrics are committed with git"
    else:
        assert not metrics, "only the figures people compare are DVC metrics"


def test_orchestrate_names_real_stages_and_prefect_schedules_the_params_cron():
    params = load_params(REPO / "params.yaml")
    assert set(params.orchestrate.timeouts_s) == set(STAGES)  # each stage has a timeout
    assert set(params.orchestrate.gpu_stages) <= set(STAGES)
    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert [s["cron"] for s in deployments["lmforge-retrain"]["schedules"]] == [params.orchestrate.retrain_cron]


def test_a_misspelt_stage_in_orchestrate_is_refused_naming_it():
    from lmforge.errors import ParamsError
    from lmforge.params import parse_params

    with pytest.raises(ParamsError, match=r"orchestrate.timeouts_s: 'pretrian': not a stage"):
        parse_params({"orchestrate": {"timeouts_s": {"pretrian": 60}}})
    with pytest.raises(ParamsError, match=r"orchestrate.gpu_stages: 'fine-tune': not a stage"):
        parse_params({"orchestrate": {"gpu_stages": ["fine-tune"]}})


def project_modules_imported_by(module_file: Path) -> set[str]:
    """Every module of lmforge/ or flows/ that `module_file` imports, directly or through other modules
    of the project, anywhere in the file (a function-level import runs too), as repository-relative
    paths. Empty `__init__.py` files hold no code and are left out."""
    import ast

    def module_files(name: str) -> list[Path]:
        parts = name.split(".")
        found = []
        for end in range(1, len(parts) + 1):
            package = REPO.joinpath(*parts[:end])
            if (package / "__init__.py").is_file() and (package / "__init__.py").read_text().strip():
                found.append(package / "__init__.py")
        module = REPO.joinpath(*parts).with_suffix(".py")
        return [*found, module] if module.is_file() else found

    seen: set[Path] = set()
    pending = [module_file]
    while pending:
        current = pending.pop()
        for node in ast.walk(ast.parse(current.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            for name in names:
                if name.split(".")[0] not in ("lmforge", "flows"):
                    continue
                for path in module_files(name):
                    if path not in seen:
                        seen.add(path)
                        pending.append(path)
    return {str(path.relative_to(REPO)) for path in seen}


@pytest.mark.parametrize("name", STAGES)
def test_code_deps_are_every_project_module_the_stage_imports(name: str):
    """Editing any module a stage runs re-runs the stage under `dvc repro`, and nothing else does."""
    entry = DVC_YAML[name].get("do", DVC_YAML[name])
    listed = {dep for dep in entry["deps"] if dep.startswith(("lmforge/", "stages/", "flows/"))}
    imported = project_modules_imported_by(REPO / "stages" / f"{name}.py") | {f"stages/{name}.py"}
    missing, extra = sorted(imported - listed), sorted(listed - imported)
    assert not missing and not extra, (
        f"dvc.yaml stage {name}: deps miss {missing}, list {extra} it does not import; its code deps are:\n"
        + "\n".join(f"      - {path}" for path in sorted(imported))
    )


@pytest.mark.parametrize("stage", [s for s in RESOLVED if s.addressing.split("@")[0] in ("finetune", "optimize")],
                         ids=lambda stage: stage.addressing)  # fmt: skip
def test_a_task_depends_on_its_own_base_and_dataset_only(stage: Any):
    """Retraining the decoder does not re-fine-tune the encoder's tasks; a new dataset does not re-fine-tune
    the tasks of the others."""
    task = load_params(REPO / "params.yaml").finetune.tasks[stage.addressing.partition("@")[2]]
    paths = {dep.def_path for dep in stage.deps}
    assert {path for path in paths if path.startswith("models/pretrained")} == {f"models/pretrained/{task.base}"}
    assert {path for path in paths if path.startswith("data/")} == {
        f"data/raw/{task.dataset}",
        f"data/processed/datasets/{task.dataset}",
    }
