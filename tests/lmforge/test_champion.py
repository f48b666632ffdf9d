"""Using the champion: `lmforge predict`, `mlflow models serve` and the model card, on the smoke run's registered
models, one per task kind.

The registry is real (the session's SQLite store) and so are the servers: `mlflow models serve` runs as a
user starts it, on loopback, and its answers must equal those `lmforge predict` writes for the same rows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from lmforge import promote
from lmforge.artifacts import EvaluateReport, PromoteReport
from lmforge.cli import app
from lmforge.params import Params, deep_merge, params_to_dict, parse_params
from lmforge.predict import entities, predict_file
from lmforge.promote import PromotePaths
from tests.conftest import SmokeRun

ROWS = 7


@dataclass(frozen=True)
class Registered:
    prefix: str
    params_file: Path
    params: Params
    versions: dict[str, dict[str, str]]  # task -> {"champion", "trained", "baseline"} -> version
    reports: dict[str, PromoteReport]  # task -> the trained model's gate
    inputs: dict[str, Path]  # task -> a .jsonl of its test texts


@pytest.fixture(scope="module")
def registered(smoke_evaluated: SmokeRun, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """Each smoke task promoted under a prefix of its own: its baseline and trained model registered, one serving."""
    root = tmp_path_factory.mktemp("registered")
    prefix = f"served-{uuid.uuid4().hex[:8]}"
    params = parse_params(deep_merge(params_to_dict(smoke_evaluated.params), {"promote": {"model_prefix": prefix}}))
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_to_dict(params), allow_unicode=True), encoding="utf-8")
    versions, inputs, reports = {}, {}, {}
    for task, spec in params.finetune.tasks.items():
        optimized = root / task
        optimized.mkdir()
        (optimized / "candidate").symlink_to(smoke_evaluated.root / "reports/evaluate" / task)
        report = promote.run(promote.section(params, task), PromotePaths(
            optimized, smoke_evaluated.raw / spec.dataset, smoke_evaluated.validation / f"{spec.dataset}.json",
            optimized / "report.json", optimized / "figures.json"))  # fmt: skip
        assert report.champion_after is not None and report.baseline_version is not None
        reports[task] = report
        versions[task] = {"champion": report.champion_after.version, "trained": report.version,
                          "baseline": report.baseline_version}  # fmt: skip
        test = pd.read_parquet(smoke_evaluated.raw / spec.dataset / "test.parquet").head(ROWS)
        inputs[task] = root / f"{task}.jsonl"
        inputs[task].write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n"
                                        for text in test["text"]), encoding="utf-8")  # fmt: skip
    return Registered(prefix, params_file, params, versions, reports, inputs)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def texts_of(path: Path) -> list[str]:
    return [record["text"] for record in read_jsonl(path)]


@pytest.mark.parametrize("which", ["trained", "baseline"])
def test_predict_answers_every_row_for_every_task_kind(registered: Registered, which: str, tmp_path: Path):
    for task, spec in registered.params.finetune.tasks.items():
        out = tmp_path / f"{task}.jsonl"
        scored = predict_file(registered.prefix, task, registered.inputs[task], out,
                              registered.versions[task][which], batch_size=3, progress=False)  # fmt: skip
        assert scored.rows == ROWS and scored.model_uri.endswith(f"/{registered.versions[task][which]}")
        records = read_jsonl(out)
        assert [r["text"] for r in records] == texts_of(registered.inputs[task])  # in order, batches joined
        if spec.kind == "classification":
            assert all(r["label"] in {"pos", "neg"} and 0.5 <= r["score"] <= 1 for r in records)
        elif spec.kind == "token_classification":
            for r in records:
                assert len(r["tags"]) == len(r["words"]) and "".join(r["words"]) == r["text"].replace(" ", "")
                assert r["entities"] == entities(r["words"], r["tags"])
        else:
            assert all(isinstance(r["continuation"], str) for r in records)


def test_entities_are_the_spans_of_a_bio_tagging():
    words = ["江", "泽民", "在", "北京", "人民", "大会堂", "讲话"]
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "O"]
    assert entities(words, tags) == [
        {"text": "江泽民", "type": "PER", "start": 0, "end": 2},
        {"text": "北京", "type": "LOC", "start": 3, "end": 4},
        {"text": "人民大会堂", "type": "LOC", "start": 4, "end": 6},
    ]


def test_max_new_tokens_bounds_the_continuation(registered: Registered, tmp_path: Path):
    prompts, short, longer = tmp_path / "prompts.txt", tmp_path / "short.jsonl", tmp_path / "longer.csv"
    prompts.write_text("".join(text[:10] + "\n" for text in texts_of(registered.inputs["continuation"])), "utf-8")
    model = registered.versions["continuation"]["baseline"]  # the smoke decoder (10 steps) stops at once
    predict_file(registered.prefix, "continuation", prompts, short, model, max_new_tokens=1, progress=False)
    predict_file(registered.prefix, "continuation", prompts, longer, model, max_new_tokens=8, progress=False)
    one = [r["continuation"] for r in read_jsonl(short)]
    eight = pd.read_csv(longer, keep_default_na=False)["continuation"].tolist()
    assert all(len(a) <= 1 and b.startswith(a) for a, b in zip(one, eight, strict=True))  # greedy: a prefix
    assert sum(map(len, eight)) > sum(map(len, one)) > 0


def test_the_command_scores_a_csv_with_the_champion(registered: Registered, tmp_path: Path):
    source = tmp_path / "reviews.csv"
    pd.DataFrame({"id": [1, 2, 3], "text": texts_of(registered.inputs["sentiment"])[:3]}).to_csv(source, index=False)
    labels = tmp_path / "labels.csv"
    result = CliRunner().invoke(app, ["predict", "--task", "sentiment", "--input", str(source), "--output", str(labels),
                                      "--params", str(registered.params_file)])  # fmt: skip
    assert result.exit_code == 0, result.output
    champion = registered.versions["sentiment"]["champion"]
    assert f"3 rows scored by models:/{registered.prefix}-sentiment/{champion}" in result.output
    answers = pd.read_csv(labels)
    assert answers.columns.tolist() == ["text", "label", "score"] and len(answers) == 3


def test_a_malformed_row_is_one_line_exit_2_and_the_previous_output_stays(registered: Registered, tmp_path: Path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = json.dumps({"text": "很好"}, ensure_ascii=False)
    source.write_text("\n".join([good] * 40 + ['{"txt": "typo"}', good]) + "\n", encoding="utf-8")
    out.write_text("the previous answers\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["predict", "-t", "sentiment", "-i", str(source), "-o", str(out),
                                      "--batch-size", "8", "-p", str(registered.params_file)])  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f'error: {source}:41: no "text" string (fields: txt)']
    assert out.read_text(encoding="utf-8") == "the previous answers\n"  # 40 rows were scored; none were written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


@pytest.mark.parametrize(("arguments", "message"), [
    (["-t", "nope"], "finetune.tasks: no task named 'nope'"),
    (["-t", "sentiment", "-v", "999"], "-sentiment: no version 999 in the registry"),
    (["-t", "sentiment", "-v", "champion"], "--version: 'champion' is not a version number"),
    (["-t", "sentiment", "-o", "out.parquet"], "out.parquet: cannot write '.parquet'; give .jsonl, .csv"),
    (["-t", "sentiment", "--max-new-tokens", "0"], "--max-new-tokens: 0 is not a positive number of tokens"),
    (["-t", "sentiment", "-o", "INPUT"], "is the input too; write the answers to another file"),
])  # fmt: skip
def test_what_cannot_be_scored_is_named_in_one_line(registered: Registered, tmp_path: Path, arguments, message):
    source = registered.inputs["sentiment"]
    defaults = {"-i": str(source), "-o": str(tmp_path / "out.jsonl"), "-p": str(registered.params_file)}
    given = {key: str(source) if value == "INPUT" else value for key, value in zip(arguments[::2], arguments[1::2],
                                                                                   strict=True)}  # fmt: skip
    argv = ["predict"] + [item for key, value in {**defaults, **given}.items() for item in (key, value)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert message in result.output


def test_a_csv_with_a_byte_order_mark_and_a_batch_mixing_given_and_missing_words(
    registered: Registered, tmp_path: Path
):
    source = tmp_path / "excel.csv"
    source.write_bytes("text\n很好\n很差\n".encode("utf-8-sig"))  # Excel's "CSV UTF-8" starts with a BOM
    predict_file(registered.prefix, "sentiment", source, tmp_path / "a.jsonl", progress=False)
    assert [r["text"] for r in read_jsonl(tmp_path / "a.jsonl")] == ["很好", "很差"]
    # A tagger: one row gives its segmentation, the next does not; the batch holds both.
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"words": ["北京", "欢迎", "你"]}, ensure_ascii=False) + "\n"
                     + json.dumps({"text": "上海很大"}, ensure_ascii=False) + "\n", encoding="utf-8")  # fmt: skip
    predict_file(registered.prefix, "ner", mixed, tmp_path / "b.jsonl", batch_size=2, progress=False)
    words = [r["words"] for r in read_jsonl(tmp_path / "b.jsonl")]
    assert words == [["北京", "欢迎", "你"], ["上", "海", "很", "大"]]  # given words kept; the served split else


def test_no_champion_yet_says_how_to_get_one(registered: Registered, tmp_path: Path):
    with pytest.raises(Exception, match=r"no version holds @champion yet \(run `dvc repro promote@sentiment`"):
        predict_file("nothing-here", "sentiment", registered.inputs["sentiment"], tmp_path / "o.jsonl")


# --- mlflow models serve -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def servers(registered: Registered) -> Iterator[dict[str, int]]:
    """`mlflow models serve` of each task's @champion, started together (each loads torch: seconds)."""
    ports = {task: free_port() for task in registered.versions}
    bin_dir = str(Path(sys.executable).parent)  # as after `source .venv/bin/activate`: MLflow execs uvicorn from PATH
    activated = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    processes = [
        subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                          f"models:/{registered.prefix}-{task}@champion", "--env-manager", "local",
                          "-h", "127.0.0.1", "-p", str(port)],
                         env=activated, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for task, port in ports.items()
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        for process, port in zip(processes, ports.values(), strict=True):
            while not _healthy(port):
                if process.poll() is not None:
                    raise AssertionError(f"mlflow models serve exited {process.returncode}: {process.stderr.read()}")
                if time.monotonic() > deadline:
                    raise AssertionError("mlflow models serve did not answer /ping within 180 s")
                time.sleep(0.5)
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_mlflow_models_serve_answers_as_predict_does(registered: Registered, servers: dict[str, int], tmp_path: Path):
    for task, port in servers.items():
        out = tmp_path / f"{task}.jsonl"
        predict_file(registered.prefix, task, registered.inputs[task], out, max_new_tokens=8, progress=False)
        expected = read_jsonl(out)
        body: dict = {"dataframe_records": [{"text": r["text"]} for r in expected]}
        if registered.params.finetune.tasks[task].kind == "generation":
            body["params"] = {"max_new_tokens": 8}
        response = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
        assert len(served) == ROWS
        for got, want in zip(served, expected, strict=True):
            for key, value in got.items():
                assert value == (pytest.approx(want[key], rel=1e-5) if isinstance(value, float) else want[key]), task


# --- the model card --------------------------------------------------------------------------------


def test_each_gated_version_carries_its_model_card(registered: Registered, smoke_evaluated: SmokeRun):
    import mlflow
    from huggingface_hub import ModelCard

    client = mlflow.MlflowClient()
    for task, report in registered.reports.items():
        version = client.get_model_version(report.registered_model, report.version)
        assert version.tags["gate.run_id"] == report.mlflow_run_id
        card = ModelCard(mlflow.artifacts.load_text(f"runs:/{version.tags['gate.run_id']}/README.md"))
        assert card.text.lstrip("\n") == version.description  # the markdown; the metadata is README.md's alone
        assert card.data.tags == ["lmforge", registered.params.finetune.tasks[task].kind, f"gate-{report.decision}"]
        metrics = EvaluateReport.read(smoke_evaluated.root / "reports/evaluate" / task / "metrics.json")
        interval = f"| {metrics.primary:.4f} | [{metrics.primary_ci_low:.4f}, {metrics.primary_ci_high:.4f}] |"
        assert f"| this version {interval}" in card.text
        assert (
            f"| baseline ({metrics.baseline.name}) | {metrics.baseline.value(metrics.primary_metric):.4f}" in card.text
        )
        assert f"Gate decision: **{report.decision.upper()}**" in card.text
        assert all(f"- {reason}" in card.text for reason in report.reasons)
        assert f"test split sha256: `{metrics.test_sha256}`" in card.text
        assert f"- git commit: `{version.tags['git_commit']}`" in card.text
        if report.champion_before is not None:  # the trained model faced the baseline that took @champion first
            assert f"| champion it was compared with (version {report.champion_before}) |" in card.text


def test_a_card_longer_than_the_registry_takes_is_cut_with_a_pointer():
    from lmforge.card import DESCRIPTION_CHARS, as_description

    assert as_description("---\ntags: [a]\n---\nshort", "r1") == "short"
    cut = as_description("x" * 9000, "r1")
    assert len(cut) == DESCRIPTION_CHARS and cut.endswith("README.md of MLflow run r1)\n")


def test_a_card_that_cannot_be_rendered_never_stops_the_gate(registered: Registered):
    from lmforge.card import render_or_plain

    report = registered.reports["sentiment"]
    plain = render_or_plain(report, None, None, {})  # type: ignore[arg-type]  # what breaks rendering
    assert plain.startswith(f"# {report.registered_model}, version {report.version}")
    assert all(f"- {reason}" in plain for reason in report.reasons) and "could not be written" in plain


def test_export_writes_the_version_as_a_hugging_face_folder_with_its_card(registered: Registered, tmp_path: Path):
    import mlflow
    from huggingface_hub import ModelCard
    from transformers import AutoConfig

    from lmforge.inference import load_task_model

    out = tmp_path / "ner-model"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    trained = registered.versions["ner"]["trained"]
    result = CliRunner().invoke(app, ["export", "-t", "ner", "-v", trained, "-o", str(out), "-p",
                                      str(registered.params_file)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"models:/{registered.prefix}-ner/{trained} -> {out}" in result.output
    files = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "lmforge_task.json", "README.md"} <= files and "stale.txt" not in files
    version = mlflow.MlflowClient().get_model_version(f"{registered.prefix}-ner", trained)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card == mlflow.artifacts.load_text(f"runs:/{version.tags['gate.run_id']}/README.md")
    assert ModelCard(card).data.tags[:2] == ["lmforge", "token_classification"]
    assert AutoConfig.from_pretrained(out).model_type and load_task_model(out).kind == "token_classification"
    # Predictions from the exported folder are those of the registered version.
    predicted = tmp_path / "p.jsonl"
    predict_file(registered.prefix, "ner", registered.inputs["ner"], predicted, trained, progress=False)
    from lmforge.inference import word_tags

    rows = read_jsonl(predicted)
    assert word_tags(load_task_model(out), [r["words"] for r in rows]) == [r["tags"] for r in rows]


# --- compression -------------------------------------------------------------------------------------


def test_an_int8_folder_loads_back_exactly_as_quantized(registered: Registered, tmp_path: Path):
    import torch
    from safetensors import safe_open

    from lmforge import registry
    from lmforge.export import model_folder
    from lmforge.inference import load_task_model
    from lmforge.int8 import is_int8, quantize, write_int8

    local = registry.fetch_checked(f"{registered.prefix}-sentiment", registered.versions["sentiment"]["trained"])
    assert not isinstance(local, str)
    source = model_folder(local)
    (tmp_path / "int8").mkdir()
    layers = write_int8(source, tmp_path / "int8")
    assert layers and is_int8(tmp_path / "int8")
    with safe_open(str(tmp_path / "int8" / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor(f"{layers[0]}.weight_int8").dtype == torch.int8
    original, loaded = load_task_model(source), load_task_model(tmp_path / "int8")
    batch = original.tokenizer(["很好很好", "太差了"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = quantize(original.model)(**batch).logits
        assert torch.equal(loaded.model(**batch).logits, expected)  # the same int8 model, bit for bit


def test_compress_scores_registers_and_gates_an_int8_copy(registered: Registered, smoke_evaluated: SmokeRun,
                                                          tmp_path: Path):  # fmt: skip
    import mlflow

    from lmforge import registry
    from lmforge.compression import COMPRESSED_TAG, compress_version
    from lmforge.errors import LmforgeError

    name, trained = f"{registered.prefix}-ner", registered.versions["ner"]["trained"]
    client = mlflow.MlflowClient()
    before = registry.alias_version(client, name, registry.CHAMPION)
    assert before is not None
    done = compress_version(registered.params, "ner", trained, smoke_evaluated.raw / "people_daily", tmp_path)
    made = client.get_model_version(name, done.version)
    assert made.tags[COMPRESSED_TAG] == trained and made.tags["gate.decision"] == done.decision
    assert any(reason.startswith(("ok: size on disk", "FAIL: size on disk")) for reason in done.reasons)
    assert any("the original leads by" in reason for reason in done.reasons)
    assert (tmp_path / "reports/compress/ner/int8/metrics.json").is_file()
    serves = str(before.version) == trained and done.decision == "pass"
    assert done.champion_after == (done.version if serves else str(before.version))
    with pytest.raises(LmforgeError, match="is the task's baseline: there is no network to compress"):
        compress_version(registered.params, "ner", registered.versions["ner"]["baseline"],
                         smoke_evaluated.raw / "people_daily", tmp_path)  # fmt: skip
    with pytest.raises(
        LmforgeError, match=f"is already a compressed copy \\(int8-dynamic, made from version {trained}\\)"
    ):
        compress_version(registered.params, "ner", done.version, smoke_evaluated.raw / "people_daily", tmp_path)


@pytest.mark.parametrize("task", ["ner", "continuation"])  # a classifier's graph: the compress test below
def test_an_onnx_graph_answers_as_the_model_does(task: str, registered: Registered, tmp_path: Path):
    import onnx
    import torch

    from lmforge import registry
    from lmforge.export import model_folder
    from lmforge.inference import load_task_model
    from lmforge.onnx_export import is_onnx, write_onnx

    local = registry.fetch_checked(f"{registered.prefix}-{task}", registered.versions[task]["trained"])
    assert not isinstance(local, str)
    source = model_folder(local)
    for int8 in (False, True):
        (tmp_path / str(int8)).mkdir()
        write_onnx(source, tmp_path / str(int8), int8=int8)
    assert is_onnx(tmp_path / "True") and not list((tmp_path / "True").glob("*.safetensors"))
    weights = {
        tensor.name: tensor.data_type for tensor in onnx.load(str(tmp_path / "True/model.onnx")).graph.initializer
    }
    assert sum(kind == onnx.TensorProto.INT8 for kind in weights.values()) >= 4  # the matrix products' weights
    original, graph, small = (load_task_model(folder) for folder in (source, tmp_path / "False", tmp_path / "True"))
    texts = ["很好很好，下次还来", "太差了", "一二三四五六七八九十一二三四五六七八九十"]  # other lengths than exported
    batch = original.tokenizer(texts, return_tensors="pt", padding=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if original.meta.word_start_types:
        inputs["token_type_ids"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        expected = original.model(**inputs).logits
    assert torch.allclose(graph.model(**inputs).logits, expected, atol=1e-4)  # the float graph: the same model
    assert (small.model(**inputs).logits - expected).abs().max() < 0.5  # int8: close


def test_compress_to_onnx_registers_and_gates_the_graph(registered: Registered, smoke_evaluated: SmokeRun,
                                                        tmp_path: Path):  # fmt: skip
    import mlflow

    from lmforge.compression import COMPRESSED_TAG, compress_version

    name, trained = f"{registered.prefix}-sentiment", registered.versions["sentiment"]["trained"]
    done = compress_version(registered.params, "sentiment", trained, smoke_evaluated.raw / "sentiment", tmp_path,
                            method="onnx")  # fmt: skip
    made = mlflow.MlflowClient().get_model_version(name, done.version)
    assert made.tags[COMPRESSED_TAG] == trained and made.tags["lmforge.compression"] == "onnx-int8-dynamic"
    assert made.description.startswith(f"ONNX with int8 weights (ONNX Runtime) of version {trained}")
    assert (tmp_path / "models/compressed/sentiment/onnx/model.onnx").is_file()
    assert (tmp_path / "reports/compress/sentiment/onnx/metrics.json").is_file()
    assert f"ok: models:/{name}/{done.version} loads from the registry and predicts on a smoke input" in done.reasons
