"""Source kinds: the one place that says which kinds of source exist.

A kind is its settings key (the YAML list that configures it), its config
model, the channels its records use, and how to build its connector from one
configured entry. The config loader, the daemon's assembly, reload, `status`,
the CLI and the storage schema all read this registry; adding a kind is one
connector module plus one `register` call (see connectors/README.md).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from commsync.config.models import MailboxConfig, TwilioAccountConfig
from commsync.config.secrets import credential_path, state_path

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


# A secret's value enters the fingerprint, which is stored in MongoDB (`source_status`), only
# through PBKDF2 salted with this domain, the source's name and the key (a plain sha256 of a
# short password is a lookup away): no digest made elsewhere or for another source matches,
# and each guess costs SECRET_ROUNDS hashes. Modest on purpose: each distinct value is
# derived once per process, not at every status write; and only 128 bits of the final mix,
# which also covers the rest of the entry, are stored.
FINGERPRINT_DOMAIN = b"commsync/source-fingerprint/secret/v1"
SECRET_ROUNDS = 20_000


def fingerprint(config: Any) -> str:
    """A digest of one source's configuration, its secrets' values, and the files its secrets are read from.

    A parked source (credentials refused for days) is tried again once this
    changes: an edited entry, a new inline secret or value of its ``*_env``
    variable, or a secret file written anew (its size and time; a refresh
    token file where the daemon reads it, under ``$STATE_DIRECTORY``). Secret
    values never enter it in the clear, nor as a plain hash (see
    ``FINGERPRINT_DOMAIN``).
    """
    source = str(getattr(config, "name", ""))
    digest = hashlib.sha256(config.model_dump_json().encode())
    for key, kind, value in _secrets(config):
        if kind == "file":
            path = (state_path if key.endswith("refresh_token_file") else credential_path)(value)
            try:
                st = os.stat(path)
                digest.update(f"{key}={path}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                digest.update(f"{key}={path}:missing".encode())
        elif value is None:
            digest.update(f"{key}:unset".encode())
        else:
            digest.update(key.encode() + b"=" + _secret_digest(source, key, value))
    return digest.hexdigest()[:32]


@functools.lru_cache(maxsize=1024)
def _secret_digest(source: str, key: str, value: str) -> bytes:
    salt = b"\0".join((FINGERPRINT_DOMAIN, source.encode(), key.encode()))
    return hashlib.pbkdf2_hmac("sha256", value.encode(), salt, SECRET_ROUNDS)


def _secrets(model: Any, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, "file" | "value", the path or the value) of every secret of ``model``."""
    out: list[tuple[str, str, Any]] = []
    for name, value in model:
        key = prefix + name
        if isinstance(value, Path) and name.endswith("_file"):
            out.append((key, "file", value))
        elif isinstance(value, SecretStr):
            out.append((key, "value", value.get_secret_value()))
        elif isinstance(value, str) and name.endswith("_env"):
            out.append((key, "value", os.environ.get(value)))
        elif isinstance(value, BaseModel):
            out += _secrets(value, key + ".")
    return out


_listeners: list[Callable[[], None]] = []


def on_change(callback: Callable[[], None]) -> None:
    """Call ``callback`` whenever the set of kinds changes (the config model is rebuilt); once, however often asked."""
    if callback not in _listeners:
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
