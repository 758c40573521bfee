"""The configuration reference: every key of the YAML file, rendered from the settings models.

config/README.md carries this text between its reference markers and
tests/test_docs.py checks that it is current, so a key cannot go undocumented.
Regenerate it with ``python -m commsync.config.reference --write``.
"""

from __future__ import annotations

import argparse
import sys
import types
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .models import settings_model

START = "<!-- reference:start -->"
END = "<!-- reference:end -->"
README = Path(__file__).with_name("README.md")
_MIB = 1024 * 1024


class UndocumentedKeys(ValueError):
    """Some keys have no description in their Field(...)."""


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the settings model a key holds, whether it holds a list of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None, False


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:  # e.g. Duration inside `Duration | None`
        return _type_name(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " / ".join(_type_name(a) for a in get_args(annotation) if a is not type(None))
    if origin is Literal:
        return " / ".join(f"`{_yaml(v)}`" for v in get_args(annotation))
    if origin is list:
        return f"list of {_type_name(get_args(annotation)[0])}"
    names = {str: "string", int: "integer", bool: "bool", timedelta: "duration", date: "date", Path: "path", SecretStr: "secret"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(field: FieldInfo) -> str:
    low = high = None
    notes = []
    for meta in field.metadata:
        if isinstance(meta, annotated_types.Ge):
            low = meta.ge
        elif isinstance(meta, annotated_types.Le):
            high = meta.le
        elif isinstance(meta, annotated_types.MinLen):
            notes.append("not empty")
        elif getattr(meta, "pattern", None):
            notes.append(f"matching `{meta.pattern}`")
    if low is not None and high is not None:
        notes.insert(0, f"{low} to {high}")
    elif low is not None:
        notes.insert(0, f"at least {low}")
    elif high is not None:
        notes.insert(0, f"at most {high}")
    return ", ".join(notes)


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, timedelta):
        seconds = int(value.total_seconds())
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds and seconds % size == 0:
                return f"{seconds // size}{unit}"
        return f"{seconds}s"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _default(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    if value is None:
        return "not set"
    text = f"`{_yaml(value)}`"
    if name.endswith("_bytes") and isinstance(value, int) and value % _MIB == 0:
        text += f" ({value // _MIB} MiB)"
    return text


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def rows(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every key under ``model`` (the whole settings), depth first, in model order."""
    model = model or settings_model()
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        sub, many = _model_of(field.annotation)
        if sub is not None:
            kind = "list of sections" if many else "section"
            out.append((key, kind, _default(name, field), field.description or ""))
            out += rows(sub, key + ("[]." if many else "."))
            continue
        kind = _type_name(field.annotation)
        limits = _constraints(field)
        out.append((key, f"{kind}, {limits}" if limits else kind, _default(name, field), field.description or ""))
    return out


def render(model: type[BaseModel] | None = None) -> str:
    """The reference as a Markdown table; raises UndocumentedKeys when a key has no description."""
    table = rows(model)
    missing = [key for key, _, _, description in table if not description.strip()]
    if missing:
        raise UndocumentedKeys("keys without a description in config/models.py or config/auth.py: " + ", ".join(missing))
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(description)} |" for key, kind, default, description in table]
    return "\n".join(lines) + "\n"


def replace_section(text: str, reference: str) -> str:
    """``text`` with what lies between the reference markers replaced by ``reference``."""
    marked_section(text)  # the markers are there
    head, _, rest = text.partition(START)
    tail = rest.partition(END)[2]
    return f"{head}{START}\n{reference}{END}{tail}"


def marked_section(text: str) -> str:
    """What lies between the reference markers of ``text``."""
    _, start, rest = text.partition(START)
    section, end, _ = rest.partition(END)
    if not start or not end:
        raise ValueError(f"the markers {START} and {END} are missing")
    return section.removeprefix("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commsync.config.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--write", nargs="?", const=README, type=Path, metavar="FILE", help=f"update the marked section of FILE (default {README})")
    args = parser.parse_args(argv)
    try:
        reference = render()
    except UndocumentedKeys as exc:
        print(f"commsync: {exc}", file=sys.stderr)
        return 1
    if args.write is None:
        sys.stdout.write(reference)
        return 0
    args.write.write_text(replace_section(args.write.read_text(encoding="utf-8"), reference), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
