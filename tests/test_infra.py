"""infra/compose.yaml agrees with prefect.yaml and keeps its secrets in infra/.env.

Docker does not run on the machines this project is tested on, so the compose file itself is not
started here; tests/flows/test_trial_workers.py runs the same servers and worker without it.
"""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO


def test_compose_serves_the_work_pool_prefect_yaml_deploys_to_and_holds_no_secret():
    compose_text = (REPO / "infra/compose.yaml").read_text()
    compose = yaml.safe_load(compose_text)
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    pools = {deployment["work_pool"]["name"] for deployment in deployments}
    worker_command = compose["services"]["worker"]["command"]
    assert pools == set(re.findall(r"--pool (\S+)", worker_command))
    assert {"lmforge-pipeline", "lmforge-retrain", "lmforge-trial-worker"} <= {d["name"] for d in deployments}
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
