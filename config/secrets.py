"""Secret resolution: a secret is given inline, in a file, or in an env var.

Files are read when the secret is needed, not only at start, so a rotated
password is picked up at the next login. Relative file names are looked up in
systemd's ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``) when it is set.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr


class SecretError(ValueError):
    """A configured secret cannot be read."""


def credential_path(path: Path) -> Path:
    """Resolve a relative secret file against ``$CREDENTIALS_DIRECTORY``."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and creds:
        return Path(creds) / path
    return path


def read_secret(inline: SecretStr | None, file: Path | None, env: str | None) -> str:
    """Return the secret value from whichever of the three ways is set."""
    if inline is not None:
        return inline.get_secret_value()
    if file is not None:
        path = credential_path(file)
        try:
            # One trailing newline is an artefact of `echo > file`, not the secret.
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise SecretError(f"cannot read {path}: {exc.strerror or exc}") from None
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise SecretError(f"environment variable {env} is not set")
        return value
    raise SecretError("no secret configured")


def check_secret(inline: SecretStr | None, file: Path | None, env: str | None) -> None:
    """Fail now, at load time, if the secret could not be read later."""
    read_secret(inline, file, env)
