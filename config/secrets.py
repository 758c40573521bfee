"""Secret resolution: a secret is given inline, in a file, or in an env var.

Files are read when the secret is needed, not only at start, so a rotated
password is picked up at the next login. Relative file names are looked up in
systemd's ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``) when it is set,
under their own name or as ``commsync_NAME``, the name systemd gives each file
of the directory the unit loads (``LoadCredential=commsync:/etc/commsync/credentials``);
outside the service (an admin running ``commsync check`` by hand) in the
working directory, then in ``/etc/commsync/credentials``, where the
LoadCredential= lines point, so the same config works both ways.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import SecretStr


class SecretError(ValueError):
    """A configured secret cannot be read."""


# Where install.sh keeps the files the unit's LoadCredential= line loads.
CREDENTIALS_FALLBACK = Path(os.environ.get("COMMSYNC_CREDENTIALS_DIR", "/etc/commsync/credentials"))
# systemd names each file of a directory credential ID_FILE (sub/dir/file: ID_sub_dir_file).
DIRECTORY_CREDENTIAL_PREFIX = "commsync_"


def credential_path(path: Path) -> Path:
    """Resolve a relative secret file (see the module docstring for the order)."""
    if path.is_absolute():
        return path
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        own = Path(creds) / path  # a LoadCredential=NAME:FILE line of its own
        loaded = Path(creds) / (DIRECTORY_CREDENTIAL_PREFIX + "_".join(path.parts))
        return own if own.exists() or not loaded.exists() else loaded
    if path.exists() or not (CREDENTIALS_FALLBACK / path).exists():
        return path
    return CREDENTIALS_FALLBACK / path


def read_secret(inline: SecretStr | None, file: Path | None, env: str | None) -> str:
    """Return the secret value from whichever of the three ways is set."""
    # An empty secret (a file truncated by mistake, a variable set to nothing) would be
    # sent as an empty password at every login: refused here, saying where it came from.
    if inline is not None:
        return _not_empty(inline.get_secret_value(), "the value")
    if file is not None:
        path = credential_path(file)
        try:
            # One trailing newline is an artefact of `echo > file`, not the secret.
            return _not_empty(path.read_text(encoding="utf-8").rstrip("\r\n"), str(path))
        except OSError as exc:
            hint = ""
            if isinstance(exc, FileNotFoundError) and os.environ.get("CREDENTIALS_DIRECTORY"):
                # Found by hand but not here: the file was added after the service started.
                hint = "; systemd hands credentials over at start: restart the service after adding or changing one"
            raise SecretError(f"cannot read {path}: {exc.strerror or exc}{hint}") from None
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise SecretError(f"environment variable {env} is not set")
        return _not_empty(value, f"environment variable {env}")
    raise SecretError("no secret configured")


def _not_empty(value: str, where: str) -> str:
    if not value.strip():
        raise SecretError(f"{where} is empty")
    return value


def check_secret(inline: SecretStr | None, file: Path | None, env: str | None) -> None:
    """Fail now, at load time, if the secret could not be read later, or is empty."""
    read_secret(inline, file, env)


def state_path(path: Path) -> Path:
    """Resolve a relative file the daemon writes (a refresh token) against ``$STATE_DIRECTORY``.

    Not ``$CREDENTIALS_DIRECTORY``: that one is read-only, and a provider that
    rotates refresh tokens needs the new one saved.
    """
    state = os.environ.get("STATE_DIRECTORY")
    if not path.is_absolute() and state:
        # systemd may list several directories, separated by colons.
        return Path(state.split(":")[0]) / path
    return path


def write_secret_file(path: Path, value: str) -> None:
    """Replace ``path`` atomically with ``value``, readable by the owner only (0600).

    The new content goes to a temporary file in the same directory (created
    0600), is flushed to disk and renamed over the old one: a crash leaves the
    old secret or the new one, never half of either, and no reader ever sees
    the file with looser permissions.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
