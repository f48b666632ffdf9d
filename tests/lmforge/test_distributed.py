"""Data-parallel training under torchrun, on the CPU with the gloo backend: two real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import REPO

PROBE = Path(__file__).with_name("ddp_probe.py")


def probe(out: Path, devices: int) -> list[list[dict[str, object]]]:
    """Run the probe on `devices` ranks; return what each rank saw, by rank."""
    out.mkdir(parents=True)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}"] if devices > 1 else []
    result = subprocess.run([sys.executable, *launcher, str(PROBE), str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads((out / f"rank{rank}.json").read_text())["seen"] for rank in range(devices)]


def test_two_ranks_train_on_disjoint_rows_hold_equal_weights_and_match_one_process(tmp_path: Path):
    (first, second), (alone,) = probe(tmp_path / "two", 2), probe(tmp_path / "one", 1)
    assert len(first) == len(second) == len(alone) == 12  # one micro-batch a step, on every rank
    for rank0, rank1, single in zip(first, second, alone, strict=True):
        assert rank0["weights"] == rank1["weights"]  # bit-equal weights before every step
        assert not set(rank0["rows"]) & set(rank1["rows"])  # each rank its own rows ...
        assert sorted(rank0["rows"] + rank1["rows"]) == sorted(single["rows"])  # ... of the same batch
    # batch_size is the step's batch however many ranks share it: the same training, up to float rounding
    two, one = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("two", "one"))
    assert max(float((two[key] - one[key]).abs().max()) for key in one) < 1e-5
    # rank 0 alone checkpoints, with every rank's dropout RNG in it
    rng = load_file(str(tmp_path / "two" / "checkpoints" / "step-000012" / "rng.safetensors"))
    assert {"torch", "torch.rank1", "batches"} <= rng.keys()
