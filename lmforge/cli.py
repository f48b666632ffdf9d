"""The `lmforge` command. Every subcommand has --help.

`lmforge run` starts the Prefect flow (flows/pipeline.py) as its own process: lmforge never imports
flows/ or stages/. The other commands run stage cores through lmforge with the paths dvc.yaml gives them.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lmforge.errors import LmforgeError, fail
from lmforge.io import write_text_atomic
from lmforge.params import PROFILES, Params, load_params, params_to_dict, render_params_yaml, switch_profile
from lmforge.stage import dvc_paths, item_of, report_files

app = typer.Typer(help="lmforge: corpus -> custom language model, tracked, validated and gated.", no_args_is_help=True)
params_app = typer.Typer(help="Check, show and switch params.yaml.", no_args_is_help=True)
app.add_typer(params_app, name="params")

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", "-p", help="the params file")


@params_app.command("check")
def params_check(params: Path = PARAMS_OPTION) -> None:
    """Validate params.yaml against the schema, exactly as every stage does at start."""
    try:
        load_params(params)
    except LmforgeError as error:
        fail(error)
    typer.echo(f"{params}: ok")


@params_app.command("show")
def params_show(params: Path = PARAMS_OPTION) -> None:
    """Print the validated params as JSON (every default filled in)."""
    try:
        typer.echo(json.dumps(params_to_dict(load_params(params)), indent=2, ensure_ascii=False))
    except LmforgeError as error:
        fail(error)


@params_app.command("use")
def params_use(
    profile: str = typer.Argument(..., help=f"one of: {', '.join(PROFILES)}"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Rewrite params.yaml as a profile: default (2 CPU cores, 15 min), smoke (tests), gpu (real sizes) or
    service (default plus intent recognition on customer-service utterances).

    A profile is the schema's defaults with profiles/<profile>.yaml merged in; every key is
    written out with its help text, so DVC tracks each one. What you set in params.yaml yourself
    (datasets, tasks, models, edited values, removed entries) is kept on top of the new profile.
    """
    try:
        chosen, kept = switch_profile(params, profile)
    except LmforgeError as error:
        fail(error)
    try:  # whole or not at all: a full disk leaves the old params.yaml
        write_text_atomic(params, render_params_yaml(chosen, profile))
    except LmforgeError as error:
        fail(error)
    typer.echo(f"{params}: now the {profile} profile" + (f"; kept yours: {', '.join(kept)}" if kept else ""))


@app.command("run")
def run_pipeline(
    force: bool = typer.Option(False, "--force", help="re-run every stage, changed or not"),
    engine: str = typer.Option("prefect", "--engine", help="prefect: the Prefect flow; dvc: plain `dvc repro`"),
) -> None:
    """Run the whole pipeline under one MLflow pipeline run, then print a summary.

    The default runs flows/pipeline.py (one Prefect task per dvc.yaml stage, on a temporary local
    Prefect server unless PREFECT_API_URL points at one); `--engine dvc` runs `dvc repro` directly.
    """
    if engine == "prefect":  # the flow lives in flows/, above lmforge: started as its own process
        import subprocess
        import sys

        flow = subprocess.run([sys.executable, "-m", "flows.pipeline", *(["--force"] if force else [])])
        if flow.returncode != 0:
            raise typer.Exit(flow.returncode)
    elif engine == "dvc":
        _run_with_dvc(force)
    else:
        fail(LmforgeError(f"--engine: {engine!r} is neither prefect nor dvc"))
    status()
    typer.echo(
        "Prefect UI: prefect server start, then http://127.0.0.1:4200 (it serves the database these runs went to, "
        "$PREFECT_HOME/prefect.db, unless PREFECT_API_URL named another server)"
    )


def _run_with_dvc(force: bool) -> None:
    import os
    import subprocess

    import mlflow

    from lmforge import tracking

    parent = tracking.create_pipeline_run()
    env = {**os.environ, tracking.PARENT_ENV: parent}
    result = subprocess.run(["dvc", "repro", *(["--force"] if force else [])], env=env)
    mlflow.MlflowClient().set_terminated(parent, status="FINISHED" if result.returncode == 0 else "FAILED")
    if result.returncode != 0:
        typer.echo(f"error: the pipeline failed (dvc repro exit {result.returncode}); see the stage's message above",
                   err=True)  # fmt: skip
        raise typer.Exit(result.returncode)
    typer.echo(f"MLflow pipeline run: {parent}")


TASK_OPTION = typer.Option(..., "--task", "-t", help="a key of finetune.tasks")


@app.command("promote")
def promote_version(
    task: str = TASK_OPTION,
    version: str = typer.Option(..., "--version", "-v", help="the registered model version to gate"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Run the promotion gate on a registered version; move @champion only if it passes."""
    from lmforge import promote

    try:
        section = promote.STAGE.section(load_params(params), task)  # an unknown task fails here, naming the key
        paths = dvc_paths(f"promote@{task}")
        report = promote.gate_version(section, version, paths.dataset, paths.validation)
    except LmforgeError as error:
        fail(error)
    typer.echo(f"{report.registered_model} version {version}: gate {report.decision.upper()}")
    for reason in report.reasons:
        typer.echo(f"  {reason}")
    raise typer.Exit(0 if report.decision != "fail" else 1)


@app.command("compare")
def compare(
    task: str = TASK_OPTION,
    candidate: str = typer.Option(None, "--candidate", "-c", help="version to compare (default: @challenger)"),
    params: Path = PARAMS_OPTION,
) -> None:
    """Champion, candidate and the task's registered baseline on the frozen test set: the primary metric
    with its interval, and each one's paired improvement over the champion."""
    from lmforge import registry
    from lmforge.gate import paired_bootstrap

    try:
        settings = load_params(params).promote
        name = registry.model_name(settings.model_prefix, task)
        client = registry.client()
        champion = registry.alias_version(client, name, registry.CHAMPION)
        challenger = (registry.model_version(client, name, candidate) if candidate
                      else registry.alias_version(client, name, registry.CHALLENGER))  # fmt: skip
        baselines = registry.versions_tagged(client, name, registry.MODEL_KIND_TAG, registry.BASELINE_KIND)
        baseline = max(baselines, key=lambda mv: int(mv.version)) if baselines else None
        rows = [(label, mv) for label, mv in (("champion", champion), ("candidate", challenger),
                                              ("baseline", baseline)) if mv is not None]  # fmt: skip
        if champion is None and challenger is None:
            raise LmforgeError(f"{name}: no @champion and no candidate to compare")
        # Every figure on one test split: the candidate's (today's), else the champion's own.
        on = challenger or champion
        assert on is not None  # neither: refused above
        split = registry.evidence_of(client, on).metrics.test_sha256
        evidence = {label: registry.evidence_on(client, mv, split) or registry.evidence_of(client, mv)
                    for label, mv in rows}  # fmt: skip
    except LmforgeError as error:
        fail(error)
    typer.echo(f"on test split {split[:12]} (the {'candidate' if challenger else 'champion'}'s)")
    for label, mv in rows:
        m = evidence[label].metrics
        elsewhere = "" if m.test_sha256 == split else f"  (on test split {m.test_sha256[:12]}: not comparable)"
        typer.echo(
            f"{label:>9}  version {mv.version:>3}  {m.primary_metric} {m.primary:.4f} "
            f"[{m.primary_ci_low:.4f}, {m.primary_ci_high:.4f}]  p95 {m.latency_ms_p95:.1f} ms  "
            f"gate {mv.tags.get('gate.decision', '-')}  {mv.tags.get(registry.MODEL_KIND_TAG, '')}{elsewhere}".rstrip()
        )
    if champion is None:
        return
    reference = evidence["champion"]
    for label, mv in rows[1:]:
        other = evidence[label]
        if mv.version == champion.version or not other.same_examples(reference):
            continue
        delta, lower = paired_bootstrap(other, reference, settings.bootstrap_samples, settings.confidence)
        typer.echo(f"{label} vs champion: improvement {delta:+.4f}, {settings.confidence:.0%} lower bound "
                   f"{lower:+.4f} (paired bootstrap)")  # fmt: skip


def task_params(params: Path, task: str) -> Params:
    """The validated params, once `task` is known to be a key of finetune.tasks (else one line naming it)."""
    settings = load_params(params)
    item_of(settings.finetune.tasks, task, "finetune.tasks")
    return settings


INPUT_OPTION = typer.Option(..., "--input", "-i", help='.txt (a text per line), .jsonl ("text"), .csv (a text column)')
OUTPUT_OPTION = typer.Option(..., "--output", "-o", help=".jsonl or .csv, written whole or not at all")
VERSION_OPTION = typer.Option(None, "--version", "-v", help="a registered version (default: the one holding @champion)")
BATCH_OPTION = typer.Option(32, "--batch-size", help="rows scored at once")
NEW_TOKENS_OPTION = typer.Option(None, "--max-new-tokens", help="generation: tokens to add (default: the model's, 24)")


@app.command("predict")
def predict(
    task: str = TASK_OPTION,
    input_path: Path = INPUT_OPTION,
    output_path: Path = OUTPUT_OPTION,
    version: str = VERSION_OPTION,
    batch_size: int = BATCH_OPTION,
    max_new_tokens: int = NEW_TOKENS_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """Score a file with the task's @champion (or --version), exactly as `mlflow models serve` would answer.

    Classification: label and score; token classification: words, tags and entities; generation: continuation.
    """
    from lmforge.predict import predict_file

    try:
        settings = task_params(params, task)
        scored = predict_file(settings.promote.model_prefix, task, input_path, output_path, version, batch_size,
                              max_new_tokens)  # fmt: skip
    except LmforgeError as error:
        fail(error)
    typer.echo(f"{scored.rows} rows scored by {scored.model_uri} -> {scored.output}")


EXPORT_OPTION = typer.Option(..., "--out", "-o", help="the folder to write (replaced whole, or left as it was)")


@app.command("export")
def export(
    task: str = TASK_OPTION,
    out: Path = EXPORT_OPTION,
    version: str = VERSION_OPTION,
    params: Path = PARAMS_OPTION,
) -> None:
    """Write the task's @champion (or --version) as a Hugging Face model folder, its model card as README.md."""
    from lmforge.export import export_version

    try:
        settings = task_params(params, task)
        model_uri, folder = export_version(settings.promote.model_prefix, task, version, out)
    except LmforgeError as error:
        fail(error)
    typer.echo(f"{model_uri} -> {folder} (with its model card, README.md)")


@app.command("compress")
def compress(
    task: str = TASK_OPTION,
    version: str = VERSION_OPTION,
    to: str = typer.Option("int8", "--to", help="int8: PyTorch int8 linear layers; onnx: ONNX with int8 weights"),
    params: Path = PARAMS_OPTION,
) -> None:
    """A smaller copy of the task's @champion (or --version), scored beside it on the frozen test split and
    gated: it serves only if it is not significantly worse, smaller on disk and within the latency ratio."""
    from lmforge.compression import compress_version

    try:
        settings = task_params(params, task)
        done = compress_version(settings, task, version, dvc_paths(f"evaluate@{task}").dataset, Path("."), to)
    except LmforgeError as error:
        fail(error)
    champion = done.champion_after or "-"
    typer.echo(f"{done.registered_model} version {done.version} ({done.method} of version {done.original}): "
               f"compression gate {done.decision.upper()}; @champion is version {champion}")  # fmt: skip
    for reason in done.reasons:
        typer.echo(f"  {reason}")


@app.command("rollback")
def rollback_champion(
    task: str = TASK_OPTION,
    params: Path = PARAMS_OPTION,
    force: bool = typer.Option(False, "--force", help="also to a version that never passed the gate"),
    reason: str = typer.Option(None, "--reason", help="why (required with --force; recorded on the version)"),
) -> None:
    """Give @champion back to the previous champion (repeat to go further back); only to one that passed its gate."""
    from lmforge import registry

    try:
        if force and not reason:
            raise LmforgeError("--force needs --reason: say why a version that never passed the gate should serve")
        name = registry.model_name(load_params(params).promote.model_prefix, task)
        before, after = registry.rollback(registry.client(), name, reason if force else None)
    except LmforgeError as error:
        fail(error)
    typer.echo(f"{name}: @champion moved from version {before} back to version {after}")


def _print_reports(reports: list[tuple[str, Path]]) -> None:
    """The key figures of each stage report that exists, by stage."""
    from lmforge.artifacts import EvaluateReport, OptimizeReport, PreprocessReport, PromoteReport, ValidateReport

    if not any(name == "validate" for name, _ in reports):
        typer.echo("no results yet: run `make run` (or `dvc repro`)")
        raise typer.Exit(1)
    for name, path in reports:
        if name == "validate":
            for dataset, passed in ValidateReport.read(path).datasets.items():
                state = "passed" if passed.success else "FAILED"
                typer.echo(f"validate    {dataset}: {state} ({passed.evaluated} expectations)")
        elif name == "preprocess":
            stats = PreprocessReport.read(path)
            train = stats.pretrain.train
            typer.echo(f"preprocess  tokenizer {stats.tokenizer.kind} vocab {stats.tokenizer.vocab_size}; "
                       f"pretraining corpus {train.tokens:,} tokens in {train.blocks:,} blocks; "
                       f"peak RSS {stats.peak_rss_mb} MB")  # fmt: skip
        elif name == "evaluate":
            m = EvaluateReport.read(path)
            typer.echo(f"evaluate    {m.task}: {m.headline()} on {m.test_examples} test examples; "
                       f"p95 latency {m.latency_ms_p95:.1f} ms")  # fmt: skip
        elif name == "optimize":
            best = OptimizeReport.read(path)
            if best.tuned:
                typer.echo(f"optimize    {best.task}: best of {best.finished_trials} trials: val loss "
                           f"{best.best_val_loss:.4f} with {best.best_params}")  # fmt: skip
        elif name == "promote":
            report = PromoteReport.read(path)
            champion = report.champion_after.version if report.champion_after else "-"
            typer.echo(f"promote     {report.registered_model} v{report.version}: gate {report.decision.upper()}; "
                       f"@champion is v{champion}")  # fmt: skip
            for reason in report.reasons:
                typer.echo(f"              {reason}")


@app.command("status")
def status() -> None:
    """Say where the results of the last run are, with the key figures (read where dvc.yaml puts them)."""
    try:
        reports = {address: (stage.name, path) for address, (stage, path) in report_files().items() if path.is_file()}
        _print_reports(list(reports.values()))
    except LmforgeError as error:
        fail(error)
    typer.echo("results (where dvc.yaml puts them):")
    typer.echo("  data/raw/<dataset>/           train/val/test Parquet + manifest.json (frozen test sha256)")
    typer.echo("  reports/validation/           per-dataset expectation results (JSON)")
    typer.echo("  reports/validation/data_docs/<dataset>/index.html   Great Expectations Data Docs")
    typer.echo("  data/processed/               tokenizer, packed pretraining blocks, tokenized task datasets")
    typer.echo("  models/pretrained/, models/finetuned/   HF-format models (safetensors)")
    typer.echo("  reports/evaluate/<task>/      metrics.json, confusion.json, curve.json, model.json (MLflow URI)")
    typer.echo("  reports/optimize/<task>/      best_params.json, trials.json, the candidate's scores")
    typer.echo("  reports/promote/<task>.json   the gate's decision and every reason")
    typer.echo("  lmforge compare --task <task>; lmforge rollback --task <task>")
    typer.echo("  dvc metrics show; dvc plots show   the figures and plots, versioned with the pipeline")
    typer.echo("  mlflow ui --backend-store-uri sqlite:///mlflow.db   runs, nested by pipeline; models")


if __name__ == "__main__":
    app()
