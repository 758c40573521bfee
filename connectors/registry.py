"""Source kinds: the one place that says which kinds of source exist.

A kind is its settings key (the YAML list that configures it), its config
model, the channels its records use, and how to build its connector from one
configured entry. The config loader, the daemon's assembly, reload, `status`,
the CLI and the storage schema all read this registry; adding a kind is one
connector module plus one `register` call (see connectors/README.md).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from commsync.config.models import MailboxConfig, TwilioAccountConfig
from commsync.config.secrets import credential_path

from .base import Connector


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a connector may need besides its own config entry: the whole settings and the parse pool."""

    settings: Any
    pool: Any = None


@dataclass(frozen=True, slots=True)
class SourceKind:
    """One kind of source."""

    name: str  # sources[].kind in records, `kind` in `commsync status`
    settings_key: str  # the YAML list of such sources
    model: type  # the pydantic model of one entry; it must have a `name`
    channels: tuple[str, ...]  # the record channels it produces
    build: Callable[[Any, BuildContext], Connector]
    description: str = ""


_KINDS: dict[str, SourceKind] = {}


def register(kind: SourceKind) -> SourceKind:
    """Add a kind (or replace one of the same name)."""
    clash = [k for k in _KINDS.values() if k.settings_key == kind.settings_key and k.name != kind.name]
    if clash:
        raise ValueError(f"settings key {kind.settings_key!r} belongs to kind {clash[0].name!r}")
    _KINDS[kind.name] = kind
    _changed()
    return kind


def unregister(name: str) -> None:
    """Remove a kind (tests that register one of their own)."""
    if _KINDS.pop(name, None) is not None:
        _changed()


def kinds() -> list[SourceKind]:
    """Every kind, in registration order (the order sources are listed and started)."""
    return list(_KINDS.values())


def kind_of(config: Any) -> SourceKind:
    """The kind a configured source entry belongs to."""
    for kind in _KINDS.values():
        if isinstance(config, kind.model):
            return kind
    raise LookupError(f"no source kind for {type(config).__name__}")


def channels() -> list[str]:
    """Every channel a record may have, in registration order."""
    return list(dict.fromkeys(c for k in _KINDS.values() for c in k.channels))


def fingerprint(config: Any) -> str:
    """A digest of one source's configuration, and of the files its secrets are read from.

    A parked source (credentials refused for days) is tried again once this
    changes: an edited entry, or a secret file written anew. Secret values are
    not part of it (SecretStr dumps masked), only the files' size and time.
    """
    digest = hashlib.sha256(config.model_dump_json().encode())
    for path in map(credential_path, _secret_files(config)):
        try:
            st = os.stat(path)
            digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"{path}:missing".encode())
    return digest.hexdigest()[:32]


def _secret_files(model: Any) -> list[Path]:
    out: list[Path] = []
    for name, value in model:
        if isinstance(value, Path) and name.endswith("_file"):
            out.append(value)
        elif isinstance(value, BaseModel):
            out += _secret_files(value)
    return out


_listeners: list[Callable[[], None]] = []


def on_change(callback: Callable[[], None]) -> None:
    """Call ``callback`` whenever the set of kinds changes (the config model is rebuilt)."""
    _listeners.append(callback)


def _changed() -> None:
    for callback in _listeners:
        callback()


# -- the built-in kinds --------------------------------------------------------------------
# Connector modules are imported when a connector is built, not when the config loads.


def _imap(config: MailboxConfig, ctx: BuildContext) -> Connector:
    from .imap import build

    return build(config, ctx)


def _twilio(config: TwilioAccountConfig, ctx: BuildContext) -> Connector:
    from .twilio import build

    return build(config, ctx)


register(SourceKind("imap", "mailboxes", MailboxConfig, ("email",), _imap, "IMAP mailboxes to capture."))
register(
    SourceKind(
        "twilio", "twilio_accounts", TwilioAccountConfig, ("call", "sms", "whatsapp"), _twilio,
        "Twilio accounts (or subaccounts) whose calls and messages are captured.",
    )
)
