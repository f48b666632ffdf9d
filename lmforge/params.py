"""Loading params.yaml against the schema (lmforge/schema.py), one-line errors, profiles, rendering.

Every stage calls `load_params` before doing any work, so a typo or a bad value fails at once with
one line naming the key. `lmforge params use <profile>` writes params.yaml from the schema's
defaults with a profile overlay (profiles/<profile>.yaml) merged in, each key with its help text,
keeping whatever the user set in the file (their datasets, tasks, edited values).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lmforge.credentials import credential_paths
from lmforge.errors import ParamsError
from lmforge.schema import ARCHITECTURES, SOURCE_KINDS, Params

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
PROFILES = ("default", "smoke", "gpu", "service")

__all__ = ["PROFILES", "Params", "deep_merge", "load_params", "params_to_dict", "parse_params", "profile_params",
           "render_params_yaml", "switch_profile"]  # fmt: skip


def _is_union_tag(loc: tuple[int | str, ...], index: int) -> bool:
    """Discriminated unions add the chosen tag to an error's location (`...source.local.path`,
    `pretrain.models.<name>.bert.layers`); it is not a key."""
    before = [str(part) for part in loc[max(index - 2, 0) : index]]
    return (before[-1:] == ["source"] and str(loc[index]) in SOURCE_KINDS) or (
        before[:1] == ["models"] and len(before) == 2 and str(loc[index]) in ARCHITECTURES
    )


def _format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem, joined: `params.yaml: ingest.split.val: Input should be less than 0.5`."""
    problems = []
    for item in error.errors():
        loc = [str(part) for index, part in enumerate(item["loc"]) if not _is_union_tag(item["loc"], index)]
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        problems.append(f"{'.'.join(loc)}: {message}" if loc else message)
    return f"{source}: " + "; ".join(problems)


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping; raise ParamsError naming the key path on any problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    secret = credential_paths(data)
    if secret:  # params.yaml is committed, hashed into dvc.lock and logged to MLflow: never a secret
        raise ParamsError(f"{source}: {secret[0]}: holds a credential (a password in a URL, or a token); "
                          "give it through the environment instead (docs: Reliability and security)")  # fmt: skip
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


def profile_of(text: str) -> str:
    """The profile a rendered params.yaml names in its first line; "default" for a file without one."""
    first = text.splitlines()[0] if text else ""
    named = first.partition("profile: ")[2].split(".")[0].strip()
    return named if named in PROFILES else "default"


def _changes(current: dict[str, Any], reference: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """What `current` sets differently from `reference` (as an overlay), and the keys it removed."""
    changed: dict[str, Any] = {}
    removed: list[tuple[str, ...]] = [(key,) for key in reference if key not in current]
    for key, value in current.items():
        if key not in reference:
            changed[key] = value
        elif isinstance(value, dict) and isinstance(reference[key], dict):
            sub, gone = _changes(value, reference[key])
            if sub:
                changed[key] = sub
            removed += [(key, *path) for path in gone]
        elif value != reference[key]:
            changed[key] = value
    return changed, removed


def _leaves(overlay: dict[str, Any], depth: int = 3, prefix: str = "") -> list[str]:
    """Dotted keys of an overlay, at most `depth` deep (a dataset, not each of its fields)."""
    keys = []
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        keys += _leaves(value, depth - 1, f"{dotted}.") if isinstance(value, dict) and depth > 1 else [dotted]
    return keys


def switch_profile(path: Path, profile: str) -> tuple[Params, list[str]]:
    """The params of `profile` with what the user set in `path` kept: their datasets, tasks, models and
    edited values (everything that differs from the profile `path` was rendered as) and their removals.
    Returns the params and the keys kept; a file that does not validate is refused, nothing is lost."""
    target = params_to_dict(profile_params(profile))
    if not path.is_file():
        return parse_params(target), []
    current = params_to_dict(load_params(path))
    was = profile_of(path.read_text(encoding="utf-8"))
    changed, removed = _changes(current, params_to_dict(profile_params(was)))
    merged = deep_merge(target, changed)
    for keys in removed:
        parent = merged
        for key in keys[:-1]:
            parent = parent.get(key, {})
        parent.pop(keys[-1], None)
    kept = _leaves(changed) + [f"{'.'.join(keys)} (removed)" for keys in removed]
    return parse_params(merged, source=f"{path} with the {profile} profile"), kept


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
