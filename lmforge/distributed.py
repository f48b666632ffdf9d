"""Several devices in one stage: data-parallel training under torchrun.

A pretrain or finetune stage whose params ask for `training.devices: N > 1` starts itself again under
torchrun (`launch`): N processes, one per GPU on a CUDA machine (NCCL), or N processes on the CPU
(gloo). Each rank builds the same model, the same batches in the same order from the same seeded
generator, and trains on its own slice of each batch (`shard`); PyTorch's DistributedDataParallel
averages the gradients, so every rank holds the same weights after every step. `batch_size` stays
the batch of one optimizer step however many devices share it, so a run's steps, schedule and
learning rate do not depend on N. Rank 0 alone evaluates, logs, checkpoints and writes outputs; the
other ranks end their stage with `errors.Follower` once training is done.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.processes import die_with_parent

T = TypeVar("T")
RANK_ENV, WORLD_ENV = "RANK", "WORLD_SIZE"  # set by torchrun for every process it starts


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def under_torchrun() -> bool:
    return int(os.environ.get(WORLD_ENV, "1")) > 1


def die_with_launcher() -> None:
    """End this rank when its launcher ends, however it ends.

    torchrun starts each rank in a session of its own, so a SIGKILL of the stage's process group (a
    Prefect timeout, a killed worker) would leave the ranks training on, and writing the checkpoints
    the retry resumes from. Linux's parent-death signal ties each rank's life to the launcher's.
    """
    die_with_parent(signal.SIGKILL)


def init_from_env() -> None:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); nothing outside torchrun."""
    if not under_torchrun() or torch.distributed.is_initialized():
        return
    die_with_launcher()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def device() -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK) on a CUDA machine, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if under_torchrun() else 0)
    return torch.device("cpu")


def from_main(value: T) -> T:
    """Rank 0's value on every rank (a checkpoint path, a validation loss): all ranks decide alike."""
    if world_size() == 1:
        return value
    box: list[Any] = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value: T) -> list[T]:
    """Every rank's value, in rank order (each rank's dropout RNG state, for the checkpoint)."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def mean_over_ranks(value: torch.Tensor | float) -> float:
    """The mean of a per-rank figure (a shard's loss) over the ranks."""
    if world_size() == 1:
        return float(value)
    total = torch.tensor(float(value), dtype=torch.float64, device=device())
    torch.distributed.all_reduce(total)
    return float(total) / world_size()


def shard(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's slice of a batch, and the weight that makes DDP's gradient mean the batch's mean.

    Rank r takes rows r, r+N, ...; a rank left without a row (a batch smaller than N) gets the first row
    with weight 0, so every rank still joins the gradient all-reduce.
    """
    n_ranks = world_size()
    if n_ranks == 1:
        return batch, 1.0
    size = next(iter(batch.values())).shape[0]
    rows = torch.arange(rank(), size, n_ranks)
    weight = len(rows) * n_ranks / size
    if len(rows) == 0:
        rows, weight = torch.zeros(1, dtype=torch.long), 0.0
    return {key: value[rows] for key, value in batch.items()}, weight


class LossModule(nn.Module):
    """The model and its loss as one module, so DDP sees the forward pass that `loss_of` makes."""

    def __init__(self, model: nn.Module, loss_of: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.model, self.loss_of = model, loss_of

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_of(self.model, batch)


def data_parallel(model: nn.Module, loss_of: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]) -> Any:
    """`loss_of(model, batch)` as a DistributedDataParallel module (gradients averaged over the ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    module = LossModule(model, loss_of)
    ids = [device().index] if device().type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def check_devices(devices: int, key: str) -> None:
    """A request for more GPUs than the machine has is the user's params: one line, exit 2."""
    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise LmforgeError(f"{key}: {devices} devices asked, this machine has {torch.cuda.device_count()} GPU(s)")


def relaunch(devices: int, key: str, module: str, argv: Sequence[str]) -> bool:
    """Start the stage again under torchrun when its params ask for several devices and it is not under
    torchrun already; True when it did (and its ranks have run the stage)."""
    if devices <= 1 or under_torchrun():
        return False
    check_devices(devices, key)
    launch(module, argv, devices)
    return True


def launch(module: str, argv: Sequence[str], devices: int) -> None:
    """Run `python -m <module> <argv>` as `torchrun --standalone --nproc-per-node=<devices>`, in this process.

    A rank that fails ends the launch with that rank's exit code (2 for params, 75 transient, ...), so
    the exit-code contract holds through torchrun. On CPU each rank gets its share of the cores
    (torchrun alone would give each one thread).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // devices))
    # The failing rank prints its own one-line error (or traceback); torchrun's log lines about it would
    # bury that line, the one a flow reports.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = parse_args(["--standalone", f"--nproc-per-node={devices}", "--module", module, *argv])
    try:
        run(args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: nothing of its own was printed
            print(f"error: {module}: rank {rank} of {devices} ended by {failure.signal_name()}", file=sys.stderr)
            sys.exit(128 - failure.exitcode)
        sys.exit(failure.exitcode)
