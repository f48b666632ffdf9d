"""A task model with int8 weights in its linear layers (PyTorch's dynamic quantization), kept in safetensors.

Every nn.Linear becomes an int8 layer (int8 weights, activations quantized on the fly; CPU inference).
The folder is a model folder like any other: the int8 weights with their scale and zero point and every
other tensor as it was, in model.safetensors, and lmforge_int8.json naming the quantized layers, which
tells load_task_model (lmforge/inference.py) to build the architecture, quantize it and put them in.
lmforge/compression.py decides whether such a copy serves.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

INT8_FILE = "lmforge_int8.json"  # its presence marks a folder whose linear layers load as int8
WEIGHTS = "model.safetensors"


def quantize(model: torch.nn.Module) -> torch.nn.Module:
    """Every nn.Linear as an int8 dynamic-quantized layer (the model itself is left as it was)."""
    with warnings.catch_warnings():  # torch.ao's eager quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def quantized_layers(model: torch.nn.Module) -> dict[str, Any]:
    return {name: module for name, module in model.named_modules()
            if type(module).__module__.startswith("torch.ao.nn.quantized.dynamic")}  # fmt: skip


def int8_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The quantized model as plain tensors safetensors can hold: int8 weights with their scale and zero
    point, biases, and every other parameter and buffer as it is."""
    layers = quantized_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        weight, bias = layer.weight(), layer.bias()
        if weight.qscheme() != torch.per_tensor_affine:
            raise ValueError(f"{name}: {weight.qscheme()} weights are not written (per-tensor affine only)")
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        tensors[f"{name}.weight_scale"] = torch.tensor(weight.q_scale(), dtype=torch.float64)
        tensors[f"{name}.weight_zero_point"] = torch.tensor(weight.q_zero_point(), dtype=torch.int64)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in layers or owner.rsplit("._packed_params", 1)[0] in layers or not isinstance(value, torch.Tensor):
            continue  # the quantized layers' own state: written above
        tensors[key] = value.detach().contiguous()
    return tensors


def write_int8(source: Path, out: Path) -> list[str]:
    """The model folder `source` with its linear layers in int8, written into the (staging) folder `out`."""
    from safetensors.torch import save_file

    from lmforge.inference import load_task_model

    model = quantize(load_task_model(source).model)
    for path in sorted(source.iterdir()):  # config, tokenizer, lmforge_task.json, history: as they were
        if path.is_file() and path.name != WEIGHTS and not path.name.endswith(".safetensors"):
            shutil.copy2(path, out / path.name)
    tensors = int8_tensors(model)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "lmforge": "int8-dynamic"})
    layers = sorted(quantized_layers(model))
    (out / INT8_FILE).write_text(json.dumps({"scheme": "int8-dynamic", "layers": layers}, indent=2) + "\n")
    return layers


def is_int8(folder: Path) -> bool:
    return (Path(folder) / INT8_FILE).is_file()


def load_int8(folder: Path, auto_class: Any) -> torch.nn.Module:
    """A folder written by write_int8: the architecture from its config, quantized, then its tensors put in."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    tensors = load_file(str(Path(folder) / WEIGHTS))
    expected = json.loads((Path(folder) / INT8_FILE).read_text())["layers"]
    int8 = {name: {part: tensors.pop(f"{name}.{part}") for part in ("weight_int8", "weight_scale", "weight_zero_point",
                                                                     "bias") if f"{name}.{part}" in tensors}
            for name in expected}  # fmt: skip
    model = auto_class.from_config(config)
    # Everything but the linear layers goes in at full precision; then the layers are quantized and take
    # their int8 weights. Nothing may be left at its random initialisation.
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [key for key in missing if key.rsplit(".", 1)[0] not in int8]
    if missing or unexpected:
        raise ValueError(f"{folder}: {len(missing)} tensors missing ({missing[:3]}), {len(unexpected)} unexpected")
    model = quantize(model)
    layers = quantized_layers(model)
    if set(layers) != set(int8):
        raise ValueError(f"{folder}: its int8 layers differ from the architecture's ({len(int8)} vs {len(layers)})")
    for name, layer in layers.items():
        parts = int8[name]
        weight = torch._make_per_tensor_quantized_tensor(parts["weight_int8"], float(parts["weight_scale"]),
                                                         int(parts["weight_zero_point"]))  # fmt: skip
        layer.set_weight_bias(weight, parts.get("bias"))
    return model.eval()


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def median_latency_ms(original: Any, compressed: Any, inputs: list[Any]) -> tuple[float, float]:
    """Median single-input latency of two predict functions, interleaved on the same inputs."""
    timings: tuple[list[float], list[float]] = ([], [])
    for item in inputs:
        for predict, spent in ((original, timings[0]), (compressed, timings[1])):
            started = time.perf_counter()
            predict([item])
            spent.append((time.perf_counter() - started) * 1000)
    return float(np.median(timings[0])), float(np.median(timings[1]))
