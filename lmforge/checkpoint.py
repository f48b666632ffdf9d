"""Resumable training checkpoints, with no pickle anywhere.

A checkpoint is a folder `step-000050/` holding
- model.safetensors       the weights (safetensors.save_model handles tied weights)
- optimizer.safetensors   every optimizer state tensor; optimizer.json the rest (param groups)
- rng.safetensors         the global torch RNG (dropout) and the batch generator (masking, pairs);
                          under torchrun, every rank's torch RNG (`torch.rank1`, ...)
- state.json              step, epoch, position in the epoch, early-stopping state, scheduler state,
                          and the fingerprint of the run it belongs to
It is written as `step-000050.tmp/` and renamed when complete, so a kill leaves either the whole
checkpoint or none of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lmforge.io import clear_dead_writers, writing

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_generator: torch.Generator,
    state: dict[str, Any],
    keep: int,
    rank_rngs: list[torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and keep only this run's newest `keep` checkpoints.

    Checkpoints of other runs (another fingerprint: other data or params) are removed once this run
    has one of its own, and never counted against `keep`: pruning by step across runs would delete a
    new run's step 40 beside an old run's steps 80 and 120, and a killed run would start over.
    """
    final = directory / f"step-{step:06d}"
    staging = directory / f"step-{step:06d}.tmp-{os.getpid()}"  # one writer's own: a second never mixes in
    shutil.rmtree(staging, ignore_errors=True)
    with writing(final, staging), os_errors_of_safetensors():  # a full disk: no half checkpoint, one line
        staging.mkdir(parents=True)
        save_model(model, str(staging / "model.safetensors"))
        tensors, rest = _optimizer_tensors(optimizer)
        save_file(tensors, str(staging / "optimizer.safetensors"))
        (staging / "optimizer.json").write_text(json.dumps(rest))
        rng = {"torch": torch.get_rng_state(), "batches": batch_generator.get_state()}
        rng |= {f"torch.rank{rank}": state for rank, state in enumerate(rank_rngs or []) if rank > 0}
        save_file(rng, str(staging / "rng.safetensors"))
        (staging / "state.json").write_text(json.dumps({**state, "scheduler": scheduler.state_dict()}, indent=2))
    synced(staging)  # on disk before the rename makes it the newest: a power cut cannot tear it after
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    fsync_path(directory)  # the rename itself
    clear_dead_writers(directory, "step-*.tmp-*")  # a killed writer's half checkpoint
    ours = [path for path in list_checkpoints(directory) if fingerprint_of(path) == state.get("fingerprint")]
    stale = [path for path in list_checkpoints(directory) if path not in ours]
    for old in stale + ours[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def os_errors_of_safetensors() -> Iterator[None]:
    """safetensors reports a refused write as its own error ("... (os error 28)"): raise it as the OSError it is."""
    try:
        yield
    except SafetensorError as error:
        found = re.search(r"os error (\d+)", str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from error


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def synced(folder: Path) -> None:
    """Every file of `folder`, and the folder, on disk."""
    for file in folder.iterdir():
        fsync_path(file)
    fsync_path(folder)


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json")


def is_whole(path: Path) -> bool:
    """Whether a checkpoint folder holds every file, each readable (a torn write, a disk error, a truncated copy
    fails here, and resuming falls back to the checkpoint before it)."""
    from safetensors import safe_open

    try:
        for name in CHECKPOINT_FILES:
            if name.endswith(".safetensors"):
                with safe_open(str(path / name), "pt") as tensors:
                    for key in tensors.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                        tensors.get_slice(key)
            else:
                json.loads((path / name).read_text())
    except (OSError, ValueError, SafetensorError):
        return False
    return True


def fingerprint_of(path: Path) -> str | None:
    """The fingerprint of the run a checkpoint belongs to (None if its state is unreadable)."""
    try:
        found = json.loads((path / "state.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None
    return str(found) if found is not None else None


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is an interrupted write and is ignored)."""
    if not directory.is_dir():
        return []
    steps = {path: match for path in directory.iterdir() if path.is_dir() and (match := STEP_DIR.match(path.name))}
    return sorted(steps, key=lambda path: int(steps[path].group(1)))


def latest_checkpoint(directory: Path, fingerprint: str) -> Path | None:
    """The newest whole checkpoint of the run with this fingerprint, if any; a torn one is passed over."""
    for path in reversed(list_checkpoints(directory)):
        if fingerprint_of(path) == fingerprint:
            if is_whole(path):
                return path
            print(f"warning: {path}: a checkpoint with a missing or unreadable file; resuming from an earlier one",
                  file=sys.stderr)  # fmt: skip
    return None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_generator: torch.Generator,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote (the torch RNG of `rank`); return the loop state."""
    load_model(model, str(path / "model.safetensors"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    rest = json.loads((path / "optimizer.json").read_text())
    by_index: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        index, name = key.split(".", 1)
        by_index.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": by_index, "param_groups": rest["param_groups"]})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch" if rank == 0 else f"torch.rank{rank}"])
    batch_generator.set_state(rng["batches"])
    state = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(state.pop("scheduler"))
    return state
