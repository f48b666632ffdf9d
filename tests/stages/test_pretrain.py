from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lmforge.params import params_to_dict
from tests.conftest import REPO, SmokeRun, run_stage


def pretrain_params(tmp_path: Path, smoke_run: SmokeRun, **training) -> Path:
    data = params_to_dict(smoke_run.params)
    data["pretrain"]["models"] = {
        "encoder": {"architecture": "bert", "objective": "mlm", "hidden_size": 32, "ffn_size": 64, "max_length": 64},
        "nsp": {"architecture": "bert", "objective": "mlm_nsp", "hidden_size": 32, "ffn_size": 64, "max_length": 64},
        "decoder": {"architecture": "gpt", "objective": "causal", "hidden_size": 32, "ffn_size": 64, "max_length": 64},
        "lstm": {"architecture": "lstm", "objective": "causal", "hidden_size": 32, "layers": 1, "max_length": 64},
    }
    data["pretrain"]["training"].update(
        {"max_steps": 12, "batch_size": 8, "eval_every": 4, "checkpoint_every": 4, "log_every": 2,
         "max_eval_samples": 16, "early_stopping_patience": 0, **training}
    )  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def pretrain(params: Path, model: str, root: Path, smoke_run: SmokeRun) -> subprocess.CompletedProcess:
    return run_stage(
        "pretrain", "--params", params, "--model", model, "--blocks", smoke_run.processed / "pretrain",
        "--corpus", smoke_run.raw / "corpus",
        "--tokenizer", smoke_run.processed / "tokenizer",
        "--out", root / "models" / model, "--checkpoints", root / "checkpoints" / model,
        "--report", root / "reports" / f"{model}.json", "--metrics", root / "metrics" / f"{model}.json",
    )  # fmt: skip


@pytest.mark.parametrize("model", ["encoder", "nsp", "decoder", "lstm"])
def test_each_architecture_pretrains_and_reloads_from_safetensors(model: str, smoke_run: SmokeRun, tmp_path: Path):
    from lmforge.models import load_pretrained

    result = pretrain(pretrain_params(tmp_path, smoke_run), model, tmp_path, smoke_run)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "models" / model
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (out / "lmforge_params.json").is_file() and (out / "tokenizer.json").is_file()
    history = yaml.safe_load((out / "history.json").read_text())
    assert [entry["step"] for entry in history] == [4, 8, 12]
    reloaded = load_pretrained(out)
    assert sum(p.numel() for p in reloaded.parameters()) > 0


def test_a_models_own_budget_and_batch_size_override_the_shared_training(smoke_run: SmokeRun, tmp_path: Path):
    params = pretrain_params(tmp_path, smoke_run)  # shared: 12 steps of 8
    data = yaml.safe_load(params.read_text())
    data["pretrain"]["models"]["decoder"].update({"max_steps": 8, "batch_size": 4})
    params.write_text(yaml.safe_dump(data))
    result = pretrain(params, "decoder", tmp_path, smoke_run)
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = json.loads((tmp_path / "models/decoder/lmforge_params.json").read_text())
    assert (resolved["training"]["max_steps"], resolved["training"]["batch_size"]) == (8, 4)
    history = yaml.safe_load((tmp_path / "models/decoder/history.json").read_text())
    assert [entry["step"] for entry in history] == [4, 8]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 autocast runs on any CPU, deterministically
def test_killed_run_resumes_to_the_same_weights(precision: str, smoke_run: SmokeRun, tmp_path: Path):
    params = pretrain_params(tmp_path, smoke_run, max_steps=16, checkpoint_every=4, precision=precision)
    straight = tmp_path / "straight"
    assert pretrain(params, "encoder", straight, smoke_run).returncode == 0

    killed = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "stages.pretrain",
        "--params",
        str(params),
        "--model",
        "encoder",
        "--blocks",
        str(smoke_run.processed / "pretrain"),
        "--corpus",
        str(smoke_run.raw / "corpus"),
        "--tokenizer",
        str(smoke_run.processed / "tokenizer"),
        "--out",
        str(killed / "models/encoder"),
        "--checkpoints",
        str(killed / "checkpoints/encoder"),
        "--report",
        str(killed / "m.json"),
        "--metrics",
        str(killed / "figures.json"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # An earlier run of other params left higher steps behind: they must not crowd out this run's own.
    for step in (80, 120):
        foreign = killed / f"checkpoints/encoder/step-{step:06d}"
        shutil.copytree(straight / "checkpoints/encoder/step-000016", foreign)
        state = json.loads((foreign / "state.json").read_text())
        (foreign / "state.json").write_text(json.dumps({**state, "step": step, "fingerprint": "an-older-run"}))
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints/encoder/step-000008").is_dir():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "models/encoder").exists()  # killed mid-run: no model was published

    resumed = pretrain(params, "encoder", killed, smoke_run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    a = load_file(str(straight / "models/encoder/model.safetensors"))
    b = load_file(str(killed / "models/encoder/model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-5, worst
    # The published model is the best-validation one; the last step's weights must agree too.
    final_a, final_b = (load_file(str(root / "checkpoints/encoder/step-000016/model.safetensors"))
                        for root in (straight, killed))  # fmt: skip
    assert max(float((final_a[k] - final_b[k]).abs().max()) for k in final_a) <= 1e-5
    assert not (killed / "checkpoints/encoder/step-000120").exists()  # the older run's were cleared
    report = json.loads((killed / "reports" / "encoder.json").read_text())
    assert report["resumed_from_step"] >= 8 and report["steps"] == 16  # it went on from the checkpoint, to the end


@pytest.mark.parametrize("devices", [1, 2])  # under torchrun too: the rank's exit code and its one line
def test_model_shorter_than_blocks_fails_naming_the_key(devices: int, smoke_run: SmokeRun, tmp_path: Path):
    data = yaml.safe_load(pretrain_params(tmp_path, smoke_run, devices=devices).read_text())
    data["pretrain"]["models"]["encoder"]["max_length"] = 16
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    result = pretrain(tmp_path / "params.yaml", "encoder", tmp_path, smoke_run)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert "pretrain.models.encoder.max_length (16) is shorter than the packed blocks" in last_line
    assert not (tmp_path / "models" / "encoder").exists()  # nothing published


@pytest.mark.parametrize("objective", ["mlm", "mlm_nsp"])
def test_logits_only_at_masked_positions_give_the_models_own_loss_and_gradients(objective: str):
    import numpy as np
    import torch

    from lmforge.models import build_pretrain_model
    from lmforge.pretrain import SpecialIds, batch_maker, masked_lm_loss
    from lmforge.schema import ModelArchitecture

    arch = ModelArchitecture(architecture="bert", objective=objective, hidden_size=16, ffn_size=32, max_length=32)
    model = build_pretrain_model(arch, 50, 0, 2, 3, seed=0).eval()  # no dropout: both ways see one network
    ids = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, vocab_size=50)
    blocks = np.random.default_rng(0).integers(5, 50, size=(8, 32))
    blocks[:, 0] = ids.cls
    batch = batch_maker(objective, blocks, ids, 0.15)(torch.arange(8), torch.Generator().manual_seed(0))

    full = model(**batch).loss
    full.backward()
    full_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sparse = masked_lm_loss(model, batch)
    sparse.backward()
    assert torch.allclose(sparse, full, atol=1e-5)
    for name, p in model.named_parameters():
        if name in full_grads:
            assert torch.allclose(p.grad, full_grads[name], atol=1e-5), name


def test_two_devices_train_one_model_and_a_killed_run_resumes_to_the_same_weights(smoke_run: SmokeRun,
                                                                                   tmp_path: Path):  # fmt: skip
    """`training.devices: 2` runs the stage under torchrun (two gloo processes on the CPU)."""
    params = pretrain_params(tmp_path, smoke_run, max_steps=48, checkpoint_every=4, devices=2)
    straight = tmp_path / "straight"
    result = pretrain(params, "encoder", straight, smoke_run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("pretrain: val loss") == 1  # rank 0 alone reports ...
    assert [path.name for path in (straight / "models").iterdir()] == ["encoder"]  # ... and writes the one model

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "stages.pretrain", "--params", str(params), "--model", "encoder",
               "--blocks", str(smoke_run.processed / "pretrain"),
               "--corpus", str(smoke_run.raw / "corpus"), "--tokenizer", str(smoke_run.processed / "tokenizer"),
               "--out", str(killed / "models/encoder"), "--checkpoints", str(killed / "checkpoints/encoder"),
               "--report", str(killed / "m.json"), "--metrics", str(killed / "figures.json")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while not (killed / "checkpoints/encoder/step-000004").is_dir():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks
    process.wait()
    assert not (killed / "models/encoder").exists()

    resumed = pretrain(params, "encoder", killed, smoke_run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    resumed_from = json.loads((killed / "reports" / "encoder.json").read_text())["resumed_from_step"]
    assert 4 <= resumed_from < 48, resumed_from  # it trained on from the checkpoint, on both ranks
    for name in ("models/encoder/model.safetensors", "checkpoints/encoder/step-000048/model.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(killed / name))
        assert max(float((a[key].float() - b[key].float()).abs().max()) for key in a) <= 1e-5, name


def test_a_tracking_server_that_does_not_answer_is_transient_in_one_line(smoke_run: SmokeRun, tmp_path: Path):
    """Exit 75, so the flow retries it (a traceback, exit 1, would be taken for a bug and not retried)."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_stage(
        "pretrain", "--params", pretrain_params(tmp_path, smoke_run), "--model", "decoder",
        "--blocks", smoke_run.processed / "pretrain",
        "--corpus", smoke_run.raw / "corpus", "--tokenizer", smoke_run.processed / "tokenizer",
        "--out", tmp_path / "out", "--checkpoints", tmp_path / "ck", "--report", tmp_path / "r.json",
        "--metrics", tmp_path / "m.json",
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )  # fmt: skip
    assert result.returncode == 75, result.stderr[-1500:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: http://127.0.0.1:{port}: the tracking server did not answer pretrain@decoder")
    assert not (tmp_path / "out").exists()


def test_training_goes_on_while_the_tracking_server_is_down(smoke_run: SmokeRun, tmp_path: Path):
    """A real `mlflow server` killed after the first checkpoint and started again later: training does not
    wait for it (metrics go through MLflow's async queue), and the run ends with every step's metrics."""
    import mlflow

    from flows.server import wait_until_healthy
    from tests.flows.conftest import free_port
    from tests.flows.test_trial_workers import default_signals

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_command = [sys.executable, "-m", "mlflow", "server", "--port", str(port), "--workers", "1",
                      "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                      "--artifacts-destination", (tmp_path / "artifacts").as_uri()]  # fmt: skip

    def serve(log: str) -> subprocess.Popen:
        with (tmp_path / log).open("wb") as output:  # a group of its own: the server and its workers end together
            server = subprocess.Popen(server_command, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT,
                                      start_new_session=True, preexec_fn=default_signals)  # fmt: skip
        wait_until_healthy(uri, server, tmp_path / log, timeout_s=120)
        return server

    params = pretrain_params(tmp_path, smoke_run, max_steps=400, min_steps=400, log_every=2, checkpoint_every=10,
                             eval_every=50, keep_checkpoints=50)  # fmt: skip
    server = serve("mlflow-1.log")
    root = tmp_path / "run"
    command = [sys.executable, "-m", "stages.pretrain", "--params", str(params), "--model", "decoder",
               "--blocks", str(smoke_run.processed / "pretrain"),
               "--corpus", str(smoke_run.raw / "corpus"), "--tokenizer", str(smoke_run.processed / "tokenizer"),
               "--out", str(root / "out"), "--checkpoints", str(root / "ck"), "--report", str(root / "r.json"),
               "--metrics", str(root / "m.json")]  # fmt: skip
    stage = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (root / "ck/step-000010").is_dir():
            assert stage.poll() is None and time.time() < deadline, "the stage ended before the outage"
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)  # the tracking server goes away mid-run
        server.wait()
        while not (root / "ck/step-000060").is_dir():  # ... and training goes on without it
            assert stage.poll() is None and time.time() < deadline, stage.stderr.read() if stage.poll() else "stuck"
            time.sleep(0.05)
        server = serve("mlflow-2.log")  # back, with the same store
        _, stderr = stage.communicate(timeout=300)
        assert stage.returncode == 0, stderr[-2000:]
    finally:
        if stage.poll() is None:
            stage.kill()
        os.killpg(server.pid, signal.SIGKILL)
    run_id = json.loads((root / "r.json").read_text())["mlflow_run_id"]
    store = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # what the server wrote
    steps = [point.step for point in store.get_metric_history(run_id, "train_loss")]
    assert steps == list(range(2, 401, 2))  # none lost in the outage


def test_a_second_run_of_a_stage_on_the_same_outputs_is_refused_while_the_first_runs(smoke_run: SmokeRun,
                                                                                      tmp_path: Path):  # fmt: skip
    """Two `dvc repro` (or a `dvc repro` beside `lmforge run`) in one workspace never interleave one stage's
    writes: the second is refused in one line, exit 75 (try again later), and writes nothing."""
    from filelock import FileLock

    from lmforge.stage import stage_lock_path

    params = pretrain_params(tmp_path, smoke_run)
    with FileLock(str(stage_lock_path(tmp_path / "reports" / "decoder.json"))):  # the first run, still going
        second = pretrain(params, "decoder", tmp_path, smoke_run)
    assert second.returncode == 75, second.stderr[-1500:]
    (line,) = second.stderr.strip().splitlines()
    assert "pretrain@decoder: another run of it is writing" in line
    assert not (tmp_path / "models" / "decoder").exists()
    assert pretrain(params, "decoder", tmp_path, smoke_run).returncode == 0  # once the first has ended
