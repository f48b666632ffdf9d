"""The model card of a registered version: what it is for, what it learned from, how it scored, why it serves.

Hugging Face's convention (a README.md whose YAML front matter is `huggingface_hub.ModelCardData`), so the
same text reads on the hub and in a model folder; promote logs it as README.md of its run and writes its
markdown (without the metadata) as the version's description in the MLflow registry, once the gate has
decided: the figures with their intervals beside the baseline's and the champion's on the same test split,
the decision and each reason, and the lineage tags.
"""

from __future__ import annotations

from collections.abc import Mapping

from huggingface_hub import ModelCard, ModelCardData

from lmforge.artifacts import EvaluateReport, Manifest, PromoteReport

USES = {
    "classification": "gives each text one of its labels, with the label's probability",
    "token_classification": "tags each word of a sentence (BIO entity tags: entities are the spans they mark)",
    "generation": "continues a text (greedy decoding, `max_new_tokens` per request)",
}
LINEAGE = {  # tag on the version -> what a reader calls it
    "git_commit": "git commit",
    "prefect.flow_run_id": "Prefect flow run",
    "optuna.study": "Optuna study",
    "optuna.trial": "Optuna trial (best)",
    "lmforge.eval_run_id": "MLflow evaluate run",
}


MAX_LABELS_SHOWN = 12  # an intent set has dozens: the card names the first ones and says how many
DESCRIPTION_CHARS = 5000  # the registry's column (VARCHAR(5000) on PostgreSQL, which refuses a longer one)


def as_description(card: str, run_id: str) -> str:
    """The card as a version's description: its markdown without the YAML front matter (the registry's page
    renders markdown, and would show the metadata as a mangled list), cut with a pointer if it is too long."""
    text = ModelCard(card).text.lstrip("\n")
    if len(text) <= DESCRIPTION_CHARS:
        return text
    pointer = f"\n\n(cut here: the whole card is README.md of MLflow run {run_id})\n"
    return text[: DESCRIPTION_CHARS - len(pointer)] + pointer


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _metrics_table(metrics: EvaluateReport, report: PromoteReport) -> list[str]:
    better = "higher" if metrics.higher_is_better else "lower"
    base = metrics.baseline
    rows = [
        "| model | " + f"{metrics.primary_metric} ({better} is better) | 95% interval |",
        "|---|---|---|",
        f"| this version | {metrics.primary:.4f} | [{metrics.primary_ci_low:.4f}, {metrics.primary_ci_high:.4f}] |",
    ]
    if base.value(metrics.primary_metric) is not None:
        interval = f"[{_figure(base.ci_low)}, {_figure(base.ci_high)}]" if base.ci_low is not None else "-"
        rows.append(f"| baseline ({base.name}) | {_figure(base.value(metrics.primary_metric))} | {interval} |")
    if report.champion_before is not None:
        rows.append(f"| champion it was compared with (version {report.champion_before}) | "
                    f"{_figure(report.champion_primary)} | - |")  # fmt: skip
    return rows


def render(report: PromoteReport, metrics: EvaluateReport, manifest: Manifest, tags: Mapping[str, str]) -> str:
    """The card of `report.version`, from the gate's report, its evaluation, its dataset and its version's tags."""
    kind = metrics.kind
    labels = manifest.label_set()
    data = ModelCardData(
        library_name="transformers" if tags.get("lmforge.model_kind") != "baseline" else None,
        tags=["lmforge", kind, f"gate-{report.decision}"],
        datasets=[manifest.dataset],
        model_name=f"{report.registered_model} version {report.version}",
    )
    improvement = ""
    if report.improvement is not None:
        bound = report.improvement_lower_bound
        improvement = (f"\n\nImprovement over the champion: {report.improvement:+.4f} {metrics.primary_metric}, "
                       f"paired-bootstrap lower bound {'-' if bound is None else f'{bound:+.4f}'}.")  # fmt: skip
    lineage = [f"- {label}: `{tags[tag]}`" for tag, label in LINEAGE.items() if tags.get(tag)]
    lineage += [f"- `{tag.removeprefix('dvc.')}` in dvc.lock: `{value}`" for tag, value in sorted(tags.items())
                if tag.startswith("dvc.") and tag != "dvc.experiment"]  # fmt: skip
    counts = manifest.rows
    rows = ", ".join(f"{split} {counts[split]:,}" for split in ("train", "val", "test") if split in counts)
    if "source" in counts:
        rows += f" (of {counts['source']:,} in the source; {counts.get('duplicates_dropped', 0):,} duplicates dropped)"
    shown = ", ".join(labels[:MAX_LABELS_SHOWN]) + (
        f", ... ({len(labels)} in all)" if len(labels) > MAX_LABELS_SHOWN else ""
    )
    label_line = f"\n- labels: {shown}" if labels else ""
    body = f"""
# {report.registered_model}, version {report.version}

Gate decision: **{report.decision.upper()}** (MLflow run `{report.mlflow_run_id}`).

## Intended use

Task `{report.task}` ({kind}): it {USES.get(kind, kind)}. Score a file with
`lmforge predict --task {report.task} --version {report.version} --input FILE --output FILE`, or serve it with
`mlflow models serve -m models:/{report.registered_model}/{report.version} --env-manager local`.

## Training data

- dataset `{manifest.dataset}` ({manifest.kind}): {manifest.source.description}
- rows: {rows}; split by a seeded hash of each text (seed {manifest.seed}){label_line}
- source sha256: `{manifest.source.sha256}`
- test split sha256: `{manifest.test_sha256}` (every figure below is on it)

## Evaluation

On {metrics.test_examples:,} test examples; intervals are 95% bootstrap intervals.

{chr(10).join(_metrics_table(metrics, report))}{improvement}

Latency, one text at a time: p50 {metrics.latency_ms_p50:.1f} ms, p95 {metrics.latency_ms_p95:.1f} ms.

## Why it serves, or does not

{chr(10).join(f"- {reason}" for reason in report.reasons)}

## Lineage

{chr(10).join(lineage) or "- (no lineage tags on this version)"}

## Limits

- It knows only what `{manifest.dataset}` holds: text of another domain, language or time may score worse
  than the figures above, which hold for this test split only.
- Figures are from a test split drawn from the same source as its training data, not from use in service.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def render_or_plain(report: PromoteReport, metrics: EvaluateReport, manifest: Manifest, tags: Mapping[str, str]) -> str:
    """The card, or (should rendering it fail) the decision and its reasons: a card is never why a gate stops."""
    try:
        return render(report, metrics, manifest, tags)
    except Exception as error:
        reasons = "\n".join(f"- {reason}" for reason in report.reasons)
        return (
            f"# {report.registered_model}, version {report.version}\n\nGate decision: **{report.decision.upper()}**"
            f"\n\n{reasons}\n\n(the model card could not be written: {type(error).__name__}: {error})\n"
        )
