"""MkDocs hook: the params reference, generated from lmforge/schema.py when the site is built.

The schema is the one place where a key of params.yaml, its type, its default and its help text
are written down; this hook walks it (pydantic models, `Field(description=...)`) and replaces the
marker in docs/params.md with one table per section, so the page cannot drift from the code.
It imports lmforge.schema only (pydantic, no torch), so building the docs stays cheap.

Mappings whose keys the user chooses (`ingest.datasets`, `pretrain.models`, `finetune.tasks`,
`optimize.n_trials`, ...) are documented through their value type, with a placeholder for the
name: `finetune.tasks.<task>.training.max_steps`. Where the shipped params.yaml sets an entry
differently from the value type's default, the default column says so.
"""

from __future__ import annotations

import html
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from lmforge import schema

MARKER = "<!-- params-reference -->"
PROFILE = re.compile(r"^<!-- profile: ([a-z_]+) -->$", flags=re.MULTILINE)
PAGE = "params.md"

# The placeholder that stands for a user-chosen name in a mapping's key path, by field name.
PLACEHOLDERS = {
    "datasets": "dataset",
    "models": "model",
    "tasks": "task",
    "n_trials": "task",
    "floors": "task",
    "timeouts_s": "stage",
    "pools": "stage",
}
MISSING = object()  # a field without a default: the user must set it


class Row:
    """One key of params.yaml: its dotted path, type, default and help text."""

    def __init__(self, key: str, type: str, default: str, help: str) -> None:
        self.key, self.type, self.default, self.help = key, type, default, help
        self.kinds: list[str] = []  # the source kinds the key belongs to (a discriminated union)


def render(params: type[BaseModel] = schema.Params) -> str:
    """The reference as markdown: a heading and a table per top-level section of params.yaml."""
    root = params()
    out: list[str] = []
    for name, info in params.model_fields.items():
        key = info.alias or name
        section = _model_of(info.annotation)
        assert section is not None, f"top-level params key {key} is not a section"
        out.append(f"## `{key}`\n")
        doc = _doc(section)
        if doc:
            out.append(f"{_text(doc)}\n")
        out.append("| key | type | default | what it does |")
        out.append("|---|---|---|---|")
        for row in _rows(section, f"{key}.", getattr(root, name), []):
            out.append(_table_row(row))
        out.append("")
    return "\n".join(out)


def documented_keys(markdown: str) -> list[str]:
    """The dotted keys a rendered reference documents (the first column of its tables)."""
    return re.findall(r"^\| `([^`]+)` \|", markdown, flags=re.MULTILINE)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill in docs/params.md's markers (the reference, and the profiles' files)."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its marker {MARKER}: the params reference would be missing")
    root = Path(config["config_file_path"]).resolve().parent

    def profile(match: re.Match[str]) -> str:
        text = (root / "profiles" / f"{match.group(1)}.yaml").read_text(encoding="utf-8")
        return f"```yaml\n{text.rstrip()}\n```"

    return PROFILE.sub(profile, markdown.replace(MARKER, render()))


# ---------------------------------------------------------------------------------------------
# walking the schema
# ---------------------------------------------------------------------------------------------


def _rows(
    model: type[BaseModel], prefix: str, default: BaseModel | None, shipped: Sequence[tuple[str, Any]]
) -> list[Row]:
    """Rows for every key of `model` under `prefix`.

    `default` is the instance whose values are the defaults here (None: the model's own field
    defaults, inside a user-named entry); `shipped` are the entries the shipped params.yaml has
    at this place, by name, whose differing values the default column lists.
    """
    rows: list[Row] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        value = getattr(default, name) if default is not None else _field_default(info)
        here = [(label, getattr(entry, name)) for label, entry in shipped if entry is not None]
        annotation = info.annotation
        variants = _models_in(annotation)

        if _is_dict(annotation):
            rows += _mapping_rows(name, info, key, value)
        elif len(variants) > 1:  # a discriminated union: `source` and its kinds
            rows += _union_rows(key, annotation, _discriminator(info, annotation), info.description, here)
        elif variants:  # a nested section, or an optional one (null: off)
            (nested,) = variants
            if _allows_none(annotation):
                rows.append(Row(key, "mapping or `null`", f"`{_value(value)}`", _help(info, nested)))
            elif _help(info, nested):
                rows.append(Row(key, "mapping", "—", _help(info, nested)))
            inner = value if isinstance(value, BaseModel) else None
            rows += _rows(nested, f"{key}.", inner, [(label, v) for label, v in here if isinstance(v, BaseModel)])
        else:
            rows.append(Row(key, _type(annotation, info), _default_cell(value, here), _help(info, None)))
    return rows


def _mapping_rows(name: str, info: FieldInfo, key: str, value: Any) -> list[Row]:
    """A mapping from user-chosen names: documented once, through its value type."""
    placeholder = PLACEHOLDERS.get(name, "name")
    entries = value if isinstance(value, dict) else {}
    value_type = typing.get_args(info.annotation)[1]
    variants = _models_in(value_type)
    entry_key = f"{key}.<{placeholder}>"
    if not variants:  # name -> number
        shipped = ", ".join(f"{label} `{_value(v)}`" for label, v in entries.items()) or "none"
        return [Row(entry_key, _type(value_type, None), f"shipped: {shipped}", _help(info, None))]
    names = ", ".join(f"`{label}`" for label in entries) or "none"
    row = Row(entry_key, "mapping", f"shipped: {names}", _help(info, variants[0] if len(variants) == 1 else None))
    if len(variants) == 1:
        return [row, *_rows(variants[0], f"{entry_key}.", None, list(entries.items()))]
    union = _union_rows(entry_key, value_type, _discriminator(None, value_type), None, list(entries.items()))
    return [row, *union]


def _union_rows(
    key: str, annotation: Any, tag: str, description: str | None, shipped: Sequence[tuple[str, Any]]
) -> list[Row]:
    """A discriminated union (`...source`, `pretrain.models.<model>`): its tag, then each variant's keys."""
    variants = _models_in(annotation)
    kinds = {variant: _literal_values(variant.model_fields[tag].annotation) for variant in variants}
    described = []
    for variant in variants:
        about, values = _doc(variant), variant.model_fields[tag].description
        about = f"{about} ({values})" if about and values else about or values or ""
        described.append(f"{_kinds(kinds[variant])}: {_text(about)}")
    shipped_tags = ", ".join(f"{label} `{getattr(v, tag)}`" for label, v in shipped if isinstance(v, BaseModel))
    all_kinds = [kind for variant in variants for kind in kinds[variant]]
    lead = f"{_text(description.rstrip('.'))}. " if description else ""
    rows = [
        Row(
            f"{key}.{tag}",
            "one of " + ", ".join(f"`{kind}`" for kind in all_kinds),
            "required" + (f"<br>shipped: {shipped_tags}" if shipped_tags else ""),
            lead + "; ".join(described),
        )
    ]
    merged: dict[tuple[str, str, str, str], Row] = {}
    for variant in variants:
        here = [(label, v) for label, v in shipped if isinstance(v, variant)]
        for row in _rows(variant, f"{key}.", None, here):
            if row.key == f"{key}.{tag}":
                continue
            found = merged.setdefault((row.key, row.type, row.default, row.help), row)
            found.kinds += kinds[variant]
    return rows + list(merged.values())


def _discriminator(info: FieldInfo | None, annotation: Any) -> str:
    """The key that says which variant of a union a mapping is (`kind`, `architecture`)."""
    if info is not None and isinstance(info.discriminator, str):
        return info.discriminator
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, FieldInfo) and isinstance(meta.discriminator, str):
            return meta.discriminator
    raise TypeError(f"a union of models without a discriminator: {annotation}")


# ---------------------------------------------------------------------------------------------
# types, defaults and text
# ---------------------------------------------------------------------------------------------


def _field_default(info: FieldInfo) -> Any:
    if info.default is not PydanticUndefined:
        return info.default
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return MISSING


def _args(annotation: Any) -> tuple[Any, ...]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _args(typing.get_args(annotation)[0])
    return (annotation,)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    return [model for arg in _args(annotation) if (model := _model_of(arg)) is not None]


def _allows_none(annotation: Any) -> bool:
    return type(None) in _args(annotation)


def _is_dict(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


def _type(annotation: Any, info: FieldInfo | None) -> str:
    """A type as a user reads it: `int, ≥ 1`, `one of a, b`, `float or null`."""
    parts = [_one_type(arg) for arg in _args(annotation) if arg is not type(None)]
    text = " or ".join(parts)
    if _allows_none(annotation):
        text += " or `null`"
    bounds = _bounds(info.metadata if info is not None else [])
    return f"{text}, {bounds}" if bounds else text


def _one_type(annotation: Any) -> str:
    literals = _literal_values(annotation)
    if literals:
        return "one of " + ", ".join(f"`{_value(v)}`" for v in literals) if len(literals) > 1 else f"`{literals[0]}`"
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"list of {_one_type(item)}"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _bounds(metadata: Iterable[Any]) -> str:
    signs = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: ("&gt;", "gt"),
             annotated_types.Le: ("≤", "le"), annotated_types.Lt: ("&lt;", "lt")}  # fmt: skip
    out = []
    for item in metadata:
        for kind, (sign, attribute) in signs.items():
            if isinstance(item, kind):
                out.append(f"{sign} {_value(getattr(item, attribute))}")
    return ", ".join(out)


def _value(value: Any) -> str:
    """A value as it is written in params.yaml (flow style)."""
    if value is MISSING:
        return "required"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default_cell(value: Any, shipped: Sequence[tuple[str, Any]]) -> str:
    cell = "required" if value is MISSING else f"`{_value(value)}`"
    differing = [(label, v) for label, v in shipped if value is MISSING or v != value]
    if differing:
        cell += "<br>shipped: " + ", ".join(f"{label} `{_value(v)}`" for label, v in differing)
    return cell


def _doc(model: type[BaseModel]) -> str:
    """The first paragraph of a model's docstring, on one line, without its full stop."""
    doc = (model.__dict__.get("__doc__") or "").strip().split("\n\n")[0]
    return " ".join(doc.split()).rstrip(".")


def _kinds(kinds: Iterable[Any]) -> str:
    return ", ".join(f"`{kind}`" for kind in kinds)


def _help(info: FieldInfo, model: type[BaseModel] | None) -> str:
    text = info.description or (_doc(model) if model is not None else "")
    return _text(text)


def _text(text: str) -> str:
    """Help text made safe for a table cell: `<name>` is not HTML, `|` is not a column."""
    pieces = text.split("`")
    for index in range(0, len(pieces), 2):  # outside code spans only
        pieces[index] = html.escape(pieces[index], quote=False)
    return "`".join(pieces).replace("|", "\\|")


def _table_row(row: Row) -> str:
    help_text = row.help or "—"
    if row.kinds:
        help_text = f"*{_kinds(row.kinds)}:* {help_text}"
    return f"| `{row.key}` | {row.type} | {row.default} | {help_text} |"
