"""What a benchmark ran on, written beside its figures: ratios compare only within one machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def describe() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())  # fmt: skip
    flags = set(cpuinfo.split())
    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_in_hardware": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }  # fmt: skip
