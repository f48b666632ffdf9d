"""A disk that refuses a write (full, read-only): one line naming the path, exit 2, no temp files left,
the previous file whole. Real small file systems (tmpfs), mounted here; skipped where mounting is not allowed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, SmokeRun
from tests.stages.test_pretrain import pretrain, pretrain_params


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """mount(size) -> a new tmpfs of that size; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)]
        result = subprocess.run(command, capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if ".tmp" in path.name)


def test_a_full_disk_stops_training_in_one_line_naming_the_path_and_leaves_no_temp_file(
    small_disk, smoke_run: SmokeRun, tmp_path: Path
):
    disk = small_disk("256k")  # the first checkpoint (weights + optimizer state) does not fit
    result = pretrain(pretrain_params(tmp_path, smoke_run), "encoder", disk, smoke_run)
    assert result.returncode == 2, result.stderr[-1500:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {disk}/") and "No space left on device" in last, last
    assert leftovers(disk) == [] and not (disk / "models" / "encoder").exists()


def run_params_use(profile: str, params: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", "params", "use", profile, "--params", str(params)],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip


def test_params_use_on_a_full_disk_keeps_the_old_file_whole(small_disk):
    disk = small_disk("64k")
    params = disk / "params.yaml"
    shutil.copyfile(REPO / "params.yaml", params)
    before = params.read_bytes()
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * (free - 8192))  # less room left than a second params.yaml needs
    result = run_params_use("smoke", params)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {params}: cannot write: No space left")
    assert params.read_bytes() == before and leftovers(disk) == []


def test_params_use_on_a_read_only_disk_is_one_line(small_disk):
    disk = small_disk("64k")
    params = disk / "params.yaml"
    shutil.copyfile(REPO / "params.yaml", params)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    result = run_params_use("smoke", params)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {params}: cannot write: Read-only file system (errno 30)"]
    assert params.read_bytes() == (REPO / "params.yaml").read_bytes()
