"""How a mailbox logs in: its password (the default) or OAuth2 (SASL XOAUTH2).

The OAuth2 keys depend on the provider; one flat model checks them against a
table, so an error names the key that is missing or does not belong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from .secrets import check_secret, credential_path, read_secret

MICROSOFT_AUTHORITY_HOST = "https://login.microsoftonline.com"
MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_SCOPE = "https://mail.google.com/"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
GOOGLE_AUTHORIZATION_URL = "https://accounts.google.com/o/oauth2/v2/auth"

_SECRET_KEYS = ("client_secret", "client_secret_file", "client_secret_env")
_URL_KEYS = ("authority_host", "token_url", "device_authorization_url", "authorization_url")
# Which keys each provider reads (client_secret stands for its three forms).
_ALLOWED = {
    "microsoft": {"tenant_id", "client_id", "client_secret", "authority_host", "scope", "ca_file"},
    "google": {"client_id", "client_secret", "service_account_file", "refresh_token_file", "token_url", "authorization_url", "scope", "ca_file"},
    "generic": {"client_id", "client_secret", "token_url", "refresh_token_file", "scope", "device_authorization_url", "authorization_url", "ca_file"},
}
_OAUTH_KEYS = set().union(*_ALLOWED.values()) | {"provider"}


class MailboxAuth(BaseModel):
    """``auth:`` of a mailbox. ``method: password`` uses the mailbox's password keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["password", "oauth2"] = Field(
        default="password", description="`password` (the mailbox's password keys) or `oauth2` (SASL XOAUTH2)."
    )
    provider: Literal["microsoft", "google", "generic"] | None = Field(
        default=None, description="Required with `method: oauth2`. A key the provider does not use is an error."
    )
    tenant_id: str | None = Field(default=None, description="microsoft: required; the Directory (tenant) ID or domain.")
    client_id: str | None = Field(
        default=None, description="The app / OAuth client. microsoft, generic: required; google: required with a refresh token."
    )
    client_secret: SecretStr | None = Field(
        default=None,
        description=(
            "The client secret; at most one of `client_secret`, `client_secret_file`, `client_secret_env`. microsoft: required; "
            "google: required with a refresh token; generic: optional (none: public client)."
        ),
    )
    client_secret_file: Path | None = Field(
        default=None,
        description="The client secret in a file, read again at every token request; a relative name is looked up in `$CREDENTIALS_DIRECTORY`.",
    )
    client_secret_env: str | None = Field(default=None, description="The client secret in an environment variable.")
    authority_host: str | None = Field(default=None, description=f"microsoft: default {MICROSOFT_AUTHORITY_HOST} (national clouds differ).")
    service_account_file: Path | None = Field(
        default=None,
        description=(
            "google: the service account's JSON key (domain-wide delegation), read again at every token request; "
            "a relative name is looked up in `$CREDENTIALS_DIRECTORY`. Google takes exactly one of this and `refresh_token_file`."
        ),
    )
    refresh_token_file: Path | None = Field(
        default=None, description=(
            "google (refresh token), generic: required; written by `commsync auth login`; must be writable by the daemon "
            "(a rotated token is saved). A relative name is resolved against `$STATE_DIRECTORY`."
        ),
    )
    token_url: str | None = Field(default=None, description=f"The token endpoint. generic: required; google: default {GOOGLE_TOKEN_URL}.")
    scope: str | None = Field(default=None, description=f"generic: required; microsoft: default {MICROSOFT_SCOPE}; google: default {GOOGLE_SCOPE}.")
    device_authorization_url: str | None = Field(default=None, description="generic: optional, device-code sign-in for `commsync auth login`.")
    authorization_url: str | None = Field(default=None, description="google (default: Google's), generic (optional): browser sign-in for `commsync auth login`.")
    ca_file: Path | None = Field(default=None, description="CA bundle to verify the token endpoints when they have a private CA.")

    @model_validator(mode="after")
    def _fits_provider(self) -> MailboxAuth:
        given = {k for k in _OAUTH_KEYS if getattr(self, k, None) is not None}
        given |= {"client_secret"} if any(getattr(self, k) is not None for k in _SECRET_KEYS) else set()
        if self.method == "password":
            if given:
                raise ValueError(f"{', '.join(sorted(given))}: only used with method: oauth2")
            return self
        if self.provider is None:
            raise ValueError("provider is required with method: oauth2 (microsoft, google or generic)")
        extra = sorted(given - _ALLOWED[self.provider] - {"provider"})
        if extra:
            raise ValueError(f"{', '.join(extra)}: not used by provider {self.provider}")
        secrets_given = [k for k in _SECRET_KEYS if getattr(self, k) is not None]
        if len(secrets_given) > 1:
            raise ValueError(f"set at most one of {', '.join(_SECRET_KEYS)} (got {', '.join(secrets_given)})")
        for key in _URL_KEYS:
            value = getattr(self, key)
            if value is not None and not value.startswith("https://"):
                raise ValueError(f"{key} must be an https:// URL")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {self.ca_file} does not exist")
        {"microsoft": self._microsoft, "google": self._google, "generic": self._generic}[self.provider]()
        if secrets_given:
            check_secret(self.client_secret, self.client_secret_file, self.client_secret_env)
        return self

    def _require(self, *keys: str) -> None:
        for key in keys:
            present = any(getattr(self, k) is not None for k in _SECRET_KEYS) if key == "client_secret" else getattr(self, key) is not None
            if not present:
                what = "client_secret_file (or client_secret, client_secret_env)" if key == "client_secret" else key
                raise ValueError(f"{what} is required for provider {self.provider}")

    def _microsoft(self) -> None:
        self._require("tenant_id", "client_id", "client_secret")

    def _google(self) -> None:
        if (self.service_account_file is None) == (self.refresh_token_file is None):
            raise ValueError("provider google needs exactly one of service_account_file or refresh_token_file")
        if self.service_account_file is not None:
            if self.client_id is not None or self.client_secret_given:
                raise ValueError("client_id, client_secret: not used with service_account_file (the key file identifies the account)")
            self.read_service_account()
        else:
            self._require("client_id", "client_secret")

    def _generic(self) -> None:
        self._require("token_url", "client_id", "refresh_token_file", "scope")

    @property
    def client_secret_given(self) -> bool:
        return any(getattr(self, k) is not None for k in _SECRET_KEYS)

    @property
    def effective_scope(self) -> str:
        if self.scope:
            return self.scope
        return {"microsoft": MICROSOFT_SCOPE, "google": GOOGLE_SCOPE}.get(self.provider or "", "")

    def read_client_secret(self) -> str | None:
        """The client secret, read now (None for a public client)."""
        if not self.client_secret_given:
            return None
        return read_secret(self.client_secret, self.client_secret_file, self.client_secret_env)

    def read_service_account(self) -> dict[str, str]:
        """The service account key (JSON), read now; ValueError names what is wrong."""
        assert self.service_account_file is not None
        path = credential_path(self.service_account_file)
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"service_account_file: cannot read {path}: {exc.strerror or exc}") from None
        except ValueError:
            raise ValueError(f"service_account_file {path} is not JSON (download a JSON key for the service account)") from None
        if not isinstance(info, dict) or info.get("type") != "service_account" or not info.get("client_email") or not info.get("private_key"):
            raise ValueError(f"service_account_file {path} is not a service account key (type service_account, client_email, private_key)")
        return info
