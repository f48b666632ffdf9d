"""`lmforge compress`: an int8 copy of a task's model, scored and gated before it serves.

It takes the task's @champion (or a version), writes its int8 copy (lmforge/int8.py), scores both with
the evaluate code on the same test examples, registers the copy, and gives it @champion only if the
original holds it and the copy is not significantly worse (the paired bootstrap's lower bound of the
original's lead is not above zero), smaller on disk, and within the latency ratio, timed side by side.
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

COMPRESSED_TAG = "lmforge.compressed_from"  # on a compressed version: the version it was made from
LINEAGE_KEPT = ("git_commit", "task", "dataset", "dataset.test_sha256", "dataset.source_sha256", "optuna.study",
                "optuna.trial", "prefect.flow_run_id")  # fmt: skip


@dataclass(frozen=True)
class Compressed:
    registered_model: str
    original: str  # the version compressed
    version: str  # the compressed copy's version
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


def compress_version(params: Params, task: str, version: str | None, dataset_dir: Path, root: Path) -> Compressed:
    """Quantize the version (default @champion) to int8, score it beside the original with the evaluate code,
    register it, and give it @champion only if the original holds it and the compression gate passes.
    Writes models/compressed/<task> and reports/compress/<task>/{original,int8} under `root`."""
    import pandas as pd

    from lmforge.export import model_folder
    from lmforge.inference import load_task_model
    from lmforge.scoring import evaluate_model

    name = registry.model_name(params.promote.model_prefix, task)
    client = registry.client()
    chosen = registry.chosen_version(client, name, task, version)
    version = str(chosen.version)
    if chosen.tags.get(registry.MODEL_KIND_TAG) == registry.BASELINE_KIND:
        raise LmforgeError(f"{name} version {version} is the task's baseline: there is no network to compress "
                           f"(give --version of a trained one)")  # fmt: skip
    if chosen.tags.get(COMPRESSED_TAG):
        raise LmforgeError(
            f"{name} version {version} is already int8 (made from version {chosen.tags[COMPRESSED_TAG]})"
        )
    local = registry.fetch_checked(name, version)
    if isinstance(local, str):
        raise LmforgeError(local)
    source = model_folder(local)
    folder = root / "models" / "compressed" / task
    with atomic_output_dir(folder) as staging:
        write_int8(source, staging)
    scored = root / "reports" / "compress" / task
    evaluate_model(params.evaluate, task, source, dataset_dir, scored / "original")
    evaluate_model(params.evaluate, task, folder, dataset_dir, scored / "int8")
    original, compressed = Evidence.read(scored / "original"), Evidence.read(scored / "int8")
    texts = pd.read_parquet(dataset_dir / "test.parquet", columns=["text"])["text"].astype(str).tolist()
    texts = texts[: params.promote.latency_samples]
    latency = median_latency_ms(predictor(load_task_model(source), params.evaluate.max_new_tokens),
                                predictor(load_task_model(folder), params.evaluate.max_new_tokens), texts)  # fmt: skip
    ref = ModelRef.read(scored / "int8" / "model.json")
    tags = {key: chosen.tags[key] for key in LINEAGE_KEPT if key in chosen.tags}
    tags.update({registry.MODEL_KIND_TAG: registry.TRAINED_KIND, COMPRESSED_TAG: version,
                 "lmforge.compression": "int8-dynamic"})  # fmt: skip
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
            description=f"int8 (dynamic quantization) of version {version}: "
            f"compression gate {verdict.upper()}\n\n" + "\n".join(f"- {r}" for r in reasons),
        )
        if decision.passed and serves and not held:
            registry.crown(client, name, made)
        after = registry.alias_version(client, name, registry.CHAMPION)
    return Compressed(name, version, made, verdict, reasons, str(after.version) if after else None)
