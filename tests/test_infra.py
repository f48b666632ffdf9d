"""infra/compose.yaml agrees with prefect.yaml and keeps its secrets in infra/.env.

Docker does not run on the machines this project is tested on, so the compose file itself is not
started here; tests/flows/test_trial_workers.py runs the same servers and worker without it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def test_compose_serves_the_work_pool_prefect_yaml_deploys_to_and_holds_no_secret():
    compose_text = (REPO / "infra/compose.yaml").read_text()
    compose = yaml.safe_load(compose_text)
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    pools = {deployment["work_pool"]["name"] for deployment in deployments}
    workers = [service["command"] for service in compose["services"].values() if "worker start" in str(service)]
    assert pools == {pool for command in workers for pool in re.findall(r"--pool (\S+)", command)}
    # the gpu pool's worker gets the host's GPUs, and only where asked (docker compose --profile gpu)
    gpu_worker = compose["services"]["gpu-worker"]
    assert gpu_worker["profiles"] == ["gpu"]
    assert gpu_worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert {"lmforge-pipeline", "lmforge-retrain", "local", "gpu"} <= {d["name"] for d in deployments}
    # Every credential is a reference to infra/.env, never a literal.
    assert not re.search(r"postgresql(\+\w+)?://[^$\s]*:[^$\s{]+@", compose_text)
    assert ".env" in (REPO / ".gitignore").read_text()
    databases = set(re.findall(r"@postgres/(\w+)", compose_text))
    created = set(re.findall(r"CREATE DATABASE (\w+)", (REPO / "infra/postgres-init.sql").read_text()))
    assert databases <= created == {"mlflow", "prefect", "optuna", "lmforge"}


def test_the_declared_retrain_schedule_is_the_one_in_params():
    from lmforge.params import load_params

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    retrain = next(deployment for deployment in deployments if deployment["name"] == "lmforge-retrain")
    assert [schedule["cron"] for schedule in retrain["schedules"]] == [
        load_params(REPO / "params.yaml").orchestrate.retrain_cron
    ]


def bundled_default_template(worker_type: str) -> dict:
    """Prefect's own default base job template for a worker type (shipped with Prefect, read offline)."""
    import json

    import prefect

    views = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    for workers in json.loads(views.read_text()).values():
        if worker_type in workers:
            return dict(workers[worker_type]["default_base_job_configuration"])
    raise AssertionError(f"no {worker_type} worker in Prefect's metadata")


@pytest.mark.parametrize("worker_type", ["kubernetes", "docker"])
def test_the_gpu_pool_templates_extend_prefects_and_render_a_gpu_request(worker_type: str):
    import json

    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((REPO / f"infra/work-pools/gpu-{worker_type}.json").read_text())
    # Prefect's own check: every placeholder names a declared variable (what `prefect work-pool create` runs)
    WorkPoolCreate(name="gpu", type=worker_type, base_job_template=template)
    default = bundled_default_template(worker_type)
    assert default["variables"]["properties"].keys() <= template["variables"]["properties"].keys()
    assert default["job_configuration"].keys() <= template["job_configuration"].keys()
    values = {name: spec["default"] for name, spec in template["variables"]["properties"].items() if "default" in spec}
    rendered = apply_values(template["job_configuration"], values)
    if worker_type == "kubernetes":
        pod = rendered["job_manifest"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        request = rendered["container_create_kwargs"]["device_requests"][0]
        assert request["count"] == -1 and request["capabilities"] == [["gpu"]]


def test_no_password_on_a_command_line_no_port_open_to_the_network_and_no_secret_in_the_image():
    compose = yaml.safe_load((REPO / "infra/compose.yaml").read_text())
    for name, service in compose["services"].items():
        command = str(service.get("command") or service.get("entrypoint") or "")
        # a password reaches a program through its environment (export ...;), never as an argument `ps` shows
        for part in re.split(r";|&&", command):
            if "PASSWORD" in part or "AUTH_STRING" in part:
                assert part.strip().removeprefix("sh -c '").startswith(("export ", "exec infra/require-secrets.sh")), (
                    f"{name}: {part.strip()}"
                )
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published to every interface"
    # the servers start only with real secrets: not unset, not the example's
    for name in ("mlflow", "prefect", "worker", "gpu-worker"):
        assert "infra/require-secrets.sh" in compose["services"][name]["command"], name
    assert "PREFECT_SERVER_API_AUTH_STRING" in compose["services"]["prefect"]["command"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"infra/.env", "data/", "models/", "mlruns/", ".venv/", ".dvc/cache/"} <= set(ignored)
    users = re.findall(r"^USER (\S+)", (REPO / "infra/Dockerfile").read_text(), re.M)
    assert users and users[-1] not in ("root", "0")


@pytest.mark.parametrize(("value", "starts"), [("", False), ("change-me", False), ("a real one", True)])
def test_the_servers_refuse_to_start_with_an_unset_or_example_secret(value: str, starts: bool):
    import subprocess

    script = REPO / "infra/require-secrets.sh"
    env = {"PATH": "/usr/bin:/bin", "POSTGRES_PASSWORD": value}
    result = subprocess.run([str(script), "POSTGRES_PASSWORD", "--", "echo", "started"], env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert (result.returncode, result.stdout.strip() == "started") == ((0, True) if starts else (2, False))
    if not starts:
        assert "infra/.env: POSTGRES_PASSWORD" in result.stderr
