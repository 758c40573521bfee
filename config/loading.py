"""Load a YAML config file into Settings, with errors a human can act on."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .models import Settings, settings_model


class ConfigError(Exception):
    """The configuration cannot be used; the message names file, key and reason."""


def load_settings(path: str | Path) -> Settings:
    """Read, parse and validate ``path``; raise ConfigError naming what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return settings_from_dict(data, origin=str(path))


def settings_from_dict(data: dict[str, Any], *, origin: str = "<config>", environment: bool = True) -> Settings:
    """Validate an already parsed mapping; ``COMMSYNC_*`` environment overrides apply unless ``environment`` is False."""
    try:
        return (settings_model() if environment else _isolated(settings_model()))(**data)
    except ValidationError as exc:
        lines = [f"{origin}: {_where(err['loc'], data)}: {_reason(err)}" for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


@functools.cache
def _isolated(model: type[Settings]) -> type[Settings]:
    """``model`` reading its keys only from what it is given, never from the environment."""

    class Isolated(model):  # type: ignore[valid-type, misc]
        @classmethod
        def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, *others: Any, **named: Any) -> tuple[Any, ...]:
            return (init_settings,)

    return Isolated


def _where(loc: tuple[Any, ...], data: Any) -> str:
    """Render a pydantic location as a key path, naming list items by their `name`."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            name = node[item].get("name") if isinstance(node, list) and item < len(node) and isinstance(node[item], dict) else None
            parts[-1] = f"{parts[-1]}[{item}]" + (f"({name})" if name else "") if parts else f"[{item}]"
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) or "(top level)"


def _reason(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return "unknown key (check its spelling and indentation)"
    if err.get("type") == "missing":
        return "required key is missing"
    # Never echo the offending input back: it may be a password.
    return msg
