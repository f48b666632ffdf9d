"""`lmforge compress`: a smaller copy of a task's model, scored and gated before it serves.

It takes the task's @champion (or a version), writes its copy (int8: PyTorch's dynamic quantization,
lmforge/int8.py; onnx: an ONNX graph with int8 weights run by ONNX Runtime, lmforge/onnx_export.py),
scores both with the evaluate code on the same test examples, registers the copy, and gives it
@champion only if the original holds it and the copy is not significantly worse (the paired bootstrap's
lower bound of the original's lead is not above zero), smaller on disk, and within the latency ratio,
timed side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import registry, tracking
from lmforge.artifacts import ModelRef
from lmforge.errors import LmforgeError
from lmforge.gate import Evidence, decide_compression
from lmforge.int8 import folder_bytes, median_latency_ms, write_int8
from lmforge.io import atomic_output_dir
from lmforge.params import Params


@dataclass(frozen=True)
class Method:
    write: Callable[[Path, Path], Any]  # (model folder, staging folder) -> the copy written into staging
    scheme: str  # the version's lmforge.compression tag
    description: str  # how the version's description names it


def _write_onnx(source: Path, out: Path) -> None:
    from lmforge.onnx_export import write_onnx

    write_onnx(source, out)


METHODS = {
    "int8": Method(write_int8, "int8-dynamic", "int8 (dynamic quantization)"),
    "onnx": Method(_write_onnx, "onnx-int8-dynamic", "ONNX with int8 weights (ONNX Runtime)"),
}

COMPRESSED_TAG = "lmforge.compressed_from"  # on a compressed version: the version it was made from
LINEAGE_KEPT = ("git_commit", "task", "dataset", "dataset.test_sha256", "dataset.source_sha256", "optuna.study",
                "optuna.trial", "prefect.flow_run_id")  # fmt: skip


@dataclass(frozen=True)
class Compressed:
    registered_model: str
    original: str  # the version compressed
    version: str  # the compressed copy's version
    method: str  # what the copy is (METHODS' description)
    decision: str  # pass: it serves (when the original did); fail: it does not
    reasons: list[str]
    champion_after: str | None


def predictor(tm: Any, max_new_tokens: int) -> Callable[[list[str]], Any]:
    """What one request asks of a task model, by kind: the latency timing's unit of work."""
    from lmforge.inference import class_probabilities, generate, split_words, word_tags

    if tm.kind == "classification":
        return lambda texts: class_probabilities(tm, texts)
    if tm.kind == "token_classification":
        return lambda texts: word_tags(tm, [split_words(text) for text in texts])
    return lambda texts: generate(tm, texts, max_new_tokens)


def compress_version(params: Params, task: str, version: str | None, dataset_dir: Path, root: Path,
                     method: str = "int8") -> Compressed:  # fmt: skip
    """Compress the version (default @champion) by `method` (METHODS), score the copy beside the original with
    the evaluate code, register it, and give it @champion only if the original holds it and the compression
    gate passes. Writes models/compressed/<task>/<method> and reports/compress/<task>/{original,<method>}
    under `root`."""
    import pandas as pd

    from lmforge.export import model_folder
    from lmforge.inference import load_task_model
    from lmforge.scoring import evaluate_model

    if method not in METHODS:
        raise LmforgeError(f"--to: {method!r} is not a compression ({', '.join(METHODS)})")
    how = METHODS[method]
    name = registry.model_name(params.promote.model_prefix, task)
    client = registry.client()
    chosen = registry.chosen_version(client, name, task, version)
    version = str(chosen.version)
    if chosen.tags.get(registry.MODEL_KIND_TAG) == registry.BASELINE_KIND:
        raise LmforgeError(f"{name} version {version} is the task's baseline: there is no network to compress "
                           f"(give --version of a trained one)")  # fmt: skip
    if chosen.tags.get(COMPRESSED_TAG):
        scheme = chosen.tags.get("lmforge.compression", "compressed")
        raise LmforgeError(f"{name} version {version} is already a compressed copy ({scheme}, made from version "
                           f"{chosen.tags[COMPRESSED_TAG]}); give --version of the original")  # fmt: skip
    local = registry.fetch_checked(name, version)
    if isinstance(local, str):
        raise LmforgeError(local)
    source = model_folder(local)
    folder = root / "models" / "compressed" / task / method
    with atomic_output_dir(folder) as staging:
        how.write(source, staging)
    scored = root / "reports" / "compress" / task
    evaluate_model(params.evaluate, task, source, dataset_dir, scored / "original")
    evaluate_model(params.evaluate, task, folder, dataset_dir, scored / method)
    original, compressed = Evidence.read(scored / "original"), Evidence.read(scored / method)
    texts = pd.read_parquet(dataset_dir / "test.parquet", columns=["text"])["text"].astype(str).tolist()
    texts = texts[: params.promote.latency_samples]
    latency = median_latency_ms(predictor(load_task_model(source), params.evaluate.max_new_tokens),
                                predictor(load_task_model(folder), params.evaluate.max_new_tokens), texts)  # fmt: skip
    ref = ModelRef.read(scored / method / "model.json")
    tags = {key: chosen.tags[key] for key in LINEAGE_KEPT if key in chosen.tags}
    tags.update({registry.MODEL_KIND_TAG: registry.TRAINED_KIND, COMPRESSED_TAG: version,
                 "lmforge.compression": how.scheme})  # fmt: skip
    with registry.promotion_lock(name):
        made = str(registry.register(client, name, ref.model_uri, ref.run_id, tags).version)
        loads = registry.smoke_load(name, made, texts[0])
        sizes = (folder_bytes(source), folder_bytes(folder))
        decision = decide_compression(compressed, original, params.promote, sizes, latency, loads)
        verdict = "pass" if decision.passed else "fail"
        client.set_model_version_tag(name, made, "gate.decision", verdict)
        client.set_model_version_tag(name, made, "gate.reasons", "; ".join(decision.reasons)[:4900])
        champion = registry.alias_version(client, name, registry.CHAMPION)
        serves = champion is not None and str(champion.version) == version
        held = tracking.dvc_experiment()
        reasons = decision.reasons + ([] if serves else [f"held: version {version} does not hold @champion, so "
                                                         "@champion does not move"])  # fmt: skip
        if held:
            reasons.append(f"held: DVC experiment {held!r} is a what-if, so @champion does not move")
        client.update_model_version(
            name,
            made,
            description=f"{how.description} of version {version}: "
            f"compression gate {verdict.upper()}\n\n" + "\n".join(f"- {r}" for r in reasons),
        )
        if decision.passed and serves and not held:
            registry.crown(client, name, made)
        after = registry.alias_version(client, name, registry.CHAMPION)
    return Compressed(name, version, made, how.description, verdict, reasons, str(after.version) if after else None)
