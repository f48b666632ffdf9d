"""No credential in params, MLflow params, error lines or the flow's summary links."""

from __future__ import annotations

import pytest

from lmforge.credentials import is_secret_key, masked, without_credentials
from lmforge.errors import LmforgeError, ParamsError, run_main
from lmforge.params import parse_params
from lmforge.tracking import loggable_params

PASSWORD = "s3cr3t-Pa55"
TOKEN = "hf_" + "a1B2" * 9


@pytest.mark.parametrize(
    ("text", "shown"),
    [(f"postgresql://lmforge:{PASSWORD}@db:5432/optuna", "postgresql://lmforge:***@db:5432/optuna"),
     (f"cannot reach http://admin:{PASSWORD}@mlflow:5000 (503)", "cannot reach http://admin:***@mlflow:5000 (503)"),
     (f"HF_TOKEN={TOKEN} was refused", "HF_TOKEN=*** was refused"),
     ("sqlite:///mlflow.db and http://mlflow:5000", "sqlite:///mlflow.db and http://mlflow:5000")],
)  # fmt: skip
def test_passwords_in_urls_and_known_tokens_are_masked(text: str, shown: str):
    assert masked(text) == shown


@pytest.mark.parametrize(
    ("key", "secret"),
    [("hf_token", True), ("db_password", True), ("api_key", True), ("MLFLOW_TRACKING_PASSWORD", True),
     ("max_new_tokens", False), ("tokenizer", False), ("primary_metric", False), ("latency_samples", False)],
)  # fmt: skip
def test_a_key_is_secret_when_it_names_one_not_when_it_mentions_tokens(key: str, secret: bool):
    assert is_secret_key(key) is secret


def test_params_refuse_a_credential_naming_the_key_and_not_repeating_it():
    with pytest.raises(ParamsError) as refused:
        parse_params({"optimize": {"storage": f"postgresql://lmforge:{PASSWORD}@db/optuna"}})
    assert "optimize.storage: holds a credential" in str(refused.value)
    assert PASSWORD not in str(refused.value)


def test_mlflow_params_keep_max_new_tokens_drop_secret_keys_and_mask_urls():
    flat = loggable_params({"evaluate": {"max_new_tokens": 8, "hf_token": TOKEN},
                            "store": f"postgresql://u:{PASSWORD}@db/x"})  # fmt: skip
    assert flat == {"evaluate.max_new_tokens": "8", "store": "postgresql://u:***@db/x"}


def test_an_error_line_never_shows_a_password(capsys: pytest.CaptureFixture):
    def main() -> None:
        raise LmforgeError(f"optimize.storage: cannot open postgresql://u:{PASSWORD}@db/optuna (refused)")

    with pytest.raises(SystemExit):
        run_main(main)
    assert PASSWORD not in capsys.readouterr().err


def test_the_flow_links_to_a_tracking_server_without_its_credentials(monkeypatch: pytest.MonkeyPatch):
    from flows.pipeline import mlflow_link

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{PASSWORD}@mlflow:5000")
    assert mlflow_link("experiments/1", "run x") == "[run x](http://mlflow:5000/#/experiments/1)"
    assert without_credentials(f"postgresql://u:{PASSWORD}@db/x") == "postgresql://db/x"
