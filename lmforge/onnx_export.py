"""A task model as ONNX with int8 weights, run by ONNX Runtime: the deployment format serving stacks take.

`write_onnx` exports the model's logits with PyTorch's ONNX exporter (any batch size and sequence
length), then ONNX Runtime's dynamic quantization stores the weights of its matrix products (and the
embedding tables) as int8. The folder keeps the tokenizer, config and lmforge_task.json of the original,
model.onnx, and lmforge_onnx.json, which tells load_task_model (lmforge/inference.py) to run it with
ONNX Runtime. An ONNX file is a protobuf graph of operators and tensors: loading it runs no Python of
its own. lmforge/compression.py decides whether such a copy serves.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ONNX_FILE = "model.onnx"
ONNX_MARK = "lmforge_onnx.json"  # its presence marks a folder that ONNX Runtime runs
OPSET = 18


class _Logits(torch.nn.Module):
    """The task model as the graph exports it: named tensor inputs in, logits out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
        return logits


def input_names(kind: str, word_start_types: bool) -> list[str]:
    """What the graph reads: token ids and their mask; a tagger trained on word starts reads those too."""
    return ["input_ids", "attention_mask", *(["token_type_ids"] if kind == "token_classification" and word_start_types
                                              else [])]  # fmt: skip


def write_onnx(source: Path, out: Path, int8: bool = True) -> None:
    """The model folder `source` as ONNX with int8 weights (int8 false: float, as exported), written into the
    (staging) folder `out`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lmforge.inference import load_task_model

    tm = load_task_model(source)
    names = input_names(tm.kind, tm.meta.word_start_types)
    sample = tm.tokenizer(["一个例子", "例子"], padding=True, return_tensors="pt")
    ids = sample["input_ids"]
    args = (ids, sample["attention_mask"], *([torch.zeros_like(ids)] if len(names) == 3 else []))
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    float_graph = out / "float.onnx"
    # The exporter prints its progress and both tools log advice (torchvision absent, pre-processing): quiet.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_logging():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(tm.model), args, str(float_graph), input_names=names,
                          output_names=["logits"], dynamic_shapes=tuple({0: batch, 1: length} for _ in names),
                          opset_version=OPSET, dynamo=True)  # fmt: skip
        if int8:
            quantize_dynamic(str(float_graph), str(out / ONNX_FILE), weight_type=QuantType.QInt8)
        else:  # one self-contained file, as the int8 graph is
            import onnx

            onnx.save_model(onnx.load(str(float_graph)), str(out / ONNX_FILE))
    for path in out.glob("float.onnx*"):  # the float graph and any external data file it wrote
        path.unlink()
    for path in sorted(source.iterdir()):  # config, tokenizer, lmforge_task.json, history: as they were
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copy2(path, out / path.name)
    scheme = "onnx-int8-dynamic" if int8 else "onnx-float"
    (out / ONNX_MARK).write_text(json.dumps({"scheme": scheme, "opset": OPSET, "inputs": names}, indent=2) + "\n")


@contextlib.contextmanager
def _quiet_logging() -> Any:
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def is_onnx(folder: Path) -> bool:
    return (Path(folder) / ONNX_MARK).is_file()


class OnnxLogits:
    """An ONNX Runtime session called as the task model is: keyword tensors in, an object with .logits out."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the graph's optimisation notes are not the user's concern
        self.session = ort.InferenceSession(str(Path(folder) / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        self.inputs = [node.name for node in self.session.get_inputs()]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None, **_: Any) -> SimpleNamespace:  # fmt: skip
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        given = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}
        feed = {name: np.ascontiguousarray(given[name].numpy(), dtype=np.int64) for name in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))

    def eval(self) -> OnnxLogits:
        return self
