"""Checkpoints: a resumed run continues exactly where the saved one was; only complete ones count."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


@pytest.fixture(autouse=True)
def restore_global_rng() -> Iterator[None]:
    """Loading a checkpoint sets torch's global RNG: give other tests theirs back."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@dataclass
class Run:
    model: nn.Linear
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.StepLR
    generator: torch.Generator


def new_run(seed: int) -> Run:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    generator = torch.Generator().manual_seed(seed + 100)
    return Run(model, optimizer, scheduler, generator)


def train_step(run: Run, x: torch.Tensor) -> None:
    run.optimizer.zero_grad()
    run.model(x).pow(2).sum().backward()
    run.optimizer.step()
    run.scheduler.step()


def save(directory: Path, step: int, fingerprint: str = "fp-a", keep: int = 3, run: Run | None = None) -> Path:
    run = run or new_run(step)
    return save_checkpoint(directory, step, run.model, run.optimizer, run.scheduler, run.generator,
                           {"step": step, "fingerprint": fingerprint}, keep)  # fmt: skip


def test_save_then_load_restores_weights_optimizer_scheduler_and_rng(tmp_path: Path) -> None:
    x = torch.randn(5, 4)
    saved = new_run(0)
    train_step(saved, x)
    torch.rand(3, generator=saved.generator)  # move the batch generator off its seed
    loop_state = {"step": 1, "epoch": 0, "position": 5, "best": 0.25, "fingerprint": "fp-a"}
    path = save_checkpoint(tmp_path, 1, saved.model, saved.optimizer, saved.scheduler, saved.generator, loop_state, 2)
    assert path == tmp_path / "step-000001"
    # what the saved run would draw next, from both RNGs
    expected_global, expected_batches = torch.rand(4), torch.rand(4, generator=saved.generator)

    torch.manual_seed(12345)  # a fresh process: different weights, global RNG and generator
    resumed = new_run(1)
    assert not torch.equal(resumed.model.weight, saved.model.weight)
    assert load_checkpoint(path, resumed.model, resumed.optimizer, resumed.scheduler, resumed.generator) == loop_state

    for name, tensor in saved.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    for param_s, param_r in zip(saved.model.parameters(), resumed.model.parameters(), strict=True):
        state_s, state_r = saved.optimizer.state[param_s], resumed.optimizer.state[param_r]
        assert set(state_r) == set(state_s) == {"step", "exp_avg", "exp_avg_sq"}
        for key in state_s:
            assert torch.equal(torch.as_tensor(state_r[key]), torch.as_tensor(state_s[key])), key
    assert resumed.scheduler.state_dict() == saved.scheduler.state_dict()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # 0.1 halved by one scheduler step
    assert torch.equal(torch.rand(4), expected_global)
    assert torch.equal(torch.rand(4, generator=resumed.generator), expected_batches)


def test_a_resumed_run_trains_on_exactly_like_the_uninterrupted_one(tmp_path: Path) -> None:
    """Losing the Adam moments or the scheduler would show only in the steps after the resume."""
    x = torch.randn(6, 4)
    saved = new_run(0)
    train_step(saved, x)
    path = save(tmp_path, 1, run=saved)
    resumed = new_run(7)
    load_checkpoint(path, resumed.model, resumed.optimizer, resumed.scheduler, resumed.generator)
    for _ in range(3):
        train_step(saved, x)
        train_step(resumed, x)
    for name, tensor in saved.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def test_save_leaves_no_tmp_folder_and_writes_the_documented_files(tmp_path: Path) -> None:
    path = save(tmp_path, 50)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000050"]
    assert {p.name for p in path.iterdir()} == {
        "model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json"
    }  # fmt: skip
    state = json.loads((path / "state.json").read_text())
    assert state["fingerprint"] == "fp-a" and state["step"] == 50 and "scheduler" in state


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 3, fingerprint="first")
    save(tmp_path, 3, fingerprint="second")
    assert list_checkpoints(tmp_path) == [tmp_path / "step-000003"]
    assert latest_checkpoint(tmp_path, "second") == tmp_path / "step-000003"
    assert latest_checkpoint(tmp_path, "first") is None


def test_keep_prunes_all_but_the_newest_checkpoints(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000030", "step-000040"]
    save(tmp_path, 50, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000050"]


def test_keep_prunes_by_step_number_not_by_name(tmp_path: Path) -> None:
    """A step with more than six digits sorts after the six-digit ones however the folder names compare."""
    save(tmp_path, 999_999)
    save(tmp_path, 1_000_000, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-1000000"]


def test_list_checkpoints_is_oldest_first_and_ignores_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    assert list_checkpoints(tmp_path / "missing") == []
    for step in (200, 9, 31):
        save(tmp_path, step, keep=10)
    (tmp_path / "step-000500.tmp").mkdir()
    (tmp_path / "step-12").mkdir()  # fewer than six digits
    (tmp_path / "step-000600").write_text("a file, not a folder")
    (tmp_path / "notes").mkdir()
    assert list_checkpoints(tmp_path) == [tmp_path / f"step-{step:06d}" for step in (9, 31, 200)]


def test_latest_checkpoint_picks_the_newest_of_this_run_only(tmp_path: Path) -> None:
    save(tmp_path, 1, fingerprint="fp-a", keep=10)
    save(tmp_path, 2, fingerprint="fp-a", keep=10)
    assert latest_checkpoint(tmp_path, "fp-a") == tmp_path / "step-000002"
    assert latest_checkpoint(tmp_path, "fp-b") is None  # another run's checkpoints are not ours to resume
    assert latest_checkpoint(tmp_path / "missing", "fp-a") is None


def test_a_new_run_keeps_its_first_checkpoint_beside_higher_steps_of_an_older_run(tmp_path: Path) -> None:
    """Pruning by step across runs deleted the new run's step 40 (older run: 80, 120): a kill restarted it."""
    save(tmp_path, 80, fingerprint="fp-old", keep=2)
    save(tmp_path, 120, fingerprint="fp-old", keep=2)
    save(tmp_path, 40, fingerprint="fp-new", keep=2)
    assert latest_checkpoint(tmp_path, "fp-new") == tmp_path / "step-000040"
    assert list_checkpoints(tmp_path) == [tmp_path / "step-000040"]  # the stale run's are gone, ours stays
    save(tmp_path, 60, fingerprint="fp-new", keep=2)
    save(tmp_path, 100, fingerprint="fp-new", keep=2)
    assert list_checkpoints(tmp_path) == [tmp_path / "step-000060", tmp_path / "step-000100"]


def test_latest_checkpoint_ignores_a_half_written_tmp_folder(tmp_path: Path) -> None:
    save(tmp_path, 1, fingerprint="fp-a")
    complete = save(tmp_path, 2, fingerprint="fp-a")
    half = tmp_path / "step-000003.tmp"
    half.mkdir()
    (half / "state.json").write_text(json.dumps({"step": 3, "fingerprint": "fp-a"}))  # killed before the rest
    assert latest_checkpoint(tmp_path, "fp-a") == complete


def test_a_killed_writers_half_checkpoint_goes_and_a_live_writers_stays(tmp_path: Path) -> None:
    """Staging folders are per process (two writers never mix one); a dead writer's is cleared at the next save."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    (tmp_path / f"step-000003.tmp-{ended.pid}").mkdir()
    (tmp_path / f"step-000004.tmp-{os.getppid()}").mkdir()  # a process that still runs
    save(tmp_path, 5)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-000004.tmp-" + str(os.getppid()), "step-000005"]


@pytest.mark.parametrize("tear", ["truncate weights", "drop the optimizer state", "garble optimizer.json"])
def test_a_torn_newest_checkpoint_falls_back_to_the_one_before(tear: str, tmp_path: Path) -> None:
    """A checkpoint cut short (a power cut before the disk had it, a copy interrupted) is passed over."""
    before = save(tmp_path, 1, fingerprint="fp-a")
    newest = save(tmp_path, 2, fingerprint="fp-a")
    if tear == "truncate weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif tear == "drop the optimizer state":
        (newest / "optimizer.safetensors").unlink()
    else:
        (newest / "optimizer.json").write_text('{"param_groups": [')
    assert latest_checkpoint(tmp_path, "fp-a") == before
