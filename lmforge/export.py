"""`lmforge export`: a registered version as a Hugging Face model folder, its model card as README.md.

The folder is what the version serves: the weights (safetensors), tokenizer, config and
lmforge_task.json of a fine-tuned model (or a baseline's files), fetched through the gate's checks
(registry.fetch_checked: nothing of it runs), with the card promote wrote when the gate decided on it
(README.md of the gate's run, `gate.run_id` on the version). Hugging Face tools read such a folder as
a model repository: `hf upload <repo> <folder>` publishes it with its card.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import yaml

from lmforge import registry
from lmforge.errors import LmforgeError
from lmforge.io import atomic_output_dir


def model_folder(local: Path) -> Path:
    """Where a downloaded pyfunc keeps the model folder it was logged with (its `model_dir` artifact)."""
    mlmodel = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
    relative = (((mlmodel.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}).get("model_dir")
    if not relative or not (local / relative["path"]).is_dir():
        raise LmforgeError(f"{local}: its MLmodel names no model_dir artifact; not lmforge's model")
    return local / relative["path"]


def model_card(name: str, version: str, gate_run_id: str | None) -> str:
    if not gate_run_id:
        raise LmforgeError(f"{name} version {version} has not been through the gate, so it has no model card "
                           f"(lmforge promote --task <task> --version {version} decides on it)")  # fmt: skip
    try:
        return str(mlflow.artifacts.load_text(f"runs:/{gate_run_id}/README.md"))
    except Exception as error:
        if registry.not_found(error):
            raise LmforgeError(f"{name} version {version}: its gate run {gate_run_id} holds no README.md") from None
        raise registry.unavailable(f"reading the model card of {name} version {version}", error) from None


def export_version(prefix: str, task: str, version: str | None, out: Path) -> tuple[str, Path]:
    """Write the version (default: the one holding @champion) to `out` whole, or leave `out` as it was."""
    name = registry.model_name(prefix, task)
    found = registry.chosen_version(registry.client(), name, task, version)
    version = str(found.version)
    card = model_card(name, version, found.tags.get("gate.run_id"))
    local = registry.fetch_checked(name, version)
    if isinstance(local, str):
        raise LmforgeError(local)
    source = model_folder(local)
    with atomic_output_dir(out) as staging:
        for path in sorted(source.iterdir()):
            if path.is_file():
                shutil.copy2(path, staging / path.name)
            elif path.is_dir():
                shutil.copytree(path, staging / path.name)
        (staging / "README.md").write_text(card, encoding="utf-8")
    return f"models:/{name}/{version}", out
