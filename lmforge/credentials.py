"""What a credential looks like, so none is written to params, logs, MLflow or Prefect.

Params hold knobs, never secrets: a value that looks like one (a URL with a password, a token of a
known shape) is refused in params with one line naming the key; the environment carries secrets
(LMFORGE_OPTUNA_STORAGE, LMFORGE_LOCK_URL, MLFLOW_TRACKING_PASSWORD, HF_TOKEN). Anything shown (a
tracking URI, an error line) goes through `masked` first.
"""

from __future__ import annotations

import re
from typing import Any

# scheme://user:password@host: the password part (user and host stay, to say which server)
URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^\s/:@]*):(?P<password>[^\s/@]+)@")
# Tokens whose shape gives them away: Hugging Face, OpenAI-style, GitHub, AWS access keys, Slack.
TOKEN = re.compile(r"\b(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{36,}|AKIA[0-9A-Z]{16}"
                   r"|xox[baprs]-[A-Za-z0-9-]{10,})\b")  # fmt: skip
# Key names that hold a secret whatever the value (a component of the key, split on _ . -)
SECRET_PARTS = {"password", "passwd", "secret", "token", "credential", "credentials", "apikey"}
SECRET_SUFFIXES = ("api_key", "access_key", "secret_key", "private_key")


def masked(text: str) -> str:
    """`text` with every URL password and known token replaced by ***."""
    return TOKEN.sub("***", URL_PASSWORD.sub(r"\g<head>:***@", text))


def without_credentials(url: str) -> str:
    """A URL to show or link to, without its user:password@ part."""
    return re.sub(r"^(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]*@", r"\g<scheme>", url)


def looks_like_credential(value: str) -> bool:
    return masked(value) != value


def is_secret_key(key: str) -> bool:
    """Whether a key names a secret (`hf_token`, `db_password`), not merely mentions one (`max_new_tokens`)."""
    lowered = key.lower()
    return bool(set(re.split(r"[_.\-]", lowered)) & SECRET_PARTS) or lowered.endswith(SECRET_SUFFIXES)


def credential_paths(data: Any, prefix: str = "") -> list[str]:
    """The key paths of a params mapping whose values look like credentials."""
    if isinstance(data, dict):
        return [path for key, value in data.items() for path in credential_paths(value, f"{prefix}{key}.")]
    if isinstance(data, list):
        return [path for index, value in enumerate(data) for path in credential_paths(value, f"{prefix}{index}.")]
    return [prefix.rstrip(".")] if isinstance(data, str) and looks_like_credential(data) else []
