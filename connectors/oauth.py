"""OAuth2 access tokens for IMAP logins (SASL XOAUTH2), one small protocol for every provider.

A token provider hands out a bearer token for one mailbox: ``token()``. It
caches the token and fetches a new one shortly before it expires;
``token(force_refresh=True)`` skips the cache after the IMAP server refused
a token. Providers block on HTTP, so they run on the connector's IMAP thread,
as imapclient does.

* microsoft: app-only access (client-credentials grant) through ``msal``;
* google: a service account with domain-wide delegation acting as the
  mailbox user, or a stored refresh token, through ``google-auth``;
* generic: a plain refresh-token grant against any token URL.

When the identity provider says no, the error (``TokenRefused``) says what to
fix, translated from the OAuth and AADSTS error codes. A refresh token the
provider rotates is written back atomically (mode 0600). Tokens and secrets
are never logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

import requests
import structlog

from commsync.config.auth import GOOGLE_TOKEN_URL, MICROSOFT_AUTHORITY_HOST, MailboxAuth
from commsync.config.models import MailboxConfig
from commsync.config.secrets import state_path, write_secret_file

from .base import CredentialsRefused, TemporarilyUnavailable

log = structlog.get_logger(__name__)

# Fetch a new token this long before the old one expires (at most half its lifetime).
REFRESH_MARGIN = 300.0


class TokenRefused(CredentialsRefused):
    """The identity provider refused to issue a token; the message says what to fix."""


class TokenUnavailable(TemporarilyUnavailable):
    """The token endpoint could not be reached or failed; trying later may help.

    Not an OSError: the IMAP connector reports its own server's outages as
    "cannot reach HOST", and a token endpoint that is down is not that.
    """


class TokenProvider(Protocol):
    """Bearer tokens for one mailbox."""

    label: str

    def token(self, force_refresh: bool = False) -> str:
        """A valid access token; a new one when ``force_refresh`` or the cached one is about to expire."""
        ...


class CachedTokens:
    """Caching and refresh-ahead around ``_fetch`` (implemented by each provider)."""

    label = "oauth2"

    def __init__(self, *, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._value: str | None = None
        self._refresh_at = 0.0
        self.expires_at = 0.0

    def token(self, force_refresh: bool = False) -> str:
        with self._lock:
            now = self._clock()
            if force_refresh or self._value is None or now >= self._refresh_at:
                value, lifetime = self._fetch()
                self._value = value
                self.expires_at = now + lifetime
                self._refresh_at = self.expires_at - min(REFRESH_MARGIN, lifetime / 2)
            return self._value

    def _fetch(self) -> tuple[str, float]:
        """A new access token and its lifetime in seconds."""
        raise NotImplementedError


def token_provider(mailbox: MailboxConfig, *, clock: Callable[[], float] = time.time) -> TokenProvider | None:
    """The token provider a mailbox's ``auth`` asks for; None for password logins."""
    auth = mailbox.auth
    if auth.method != "oauth2":
        return None
    timeout = mailbox.timeout.total_seconds()
    if auth.provider == "microsoft":
        return MicrosoftAppTokens(auth, timeout=timeout, clock=clock)
    if auth.provider == "google" and auth.service_account_file is not None:
        return GoogleServiceAccountTokens(auth, mailbox.username, timeout=timeout, clock=clock)
    if auth.provider == "google":
        return GoogleRefreshTokens(auth, mailbox.name, timeout=timeout, clock=clock)
    return RefreshTokenGrant(auth, mailbox.name, timeout=timeout, clock=clock)


class _TokenSession(requests.Session):
    """requests.Session whose ``verify`` and timeout hold for every request.

    requests lets $REQUESTS_CA_BUNDLE override a session's ``verify``; passing
    it with each request keeps ``auth.ca_file`` in force.
    """

    def __init__(self, verify: str | bool, timeout: float):
        super().__init__()
        self.verify = verify
        self.timeout = timeout

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("verify", self.verify)
        kwargs["timeout"] = self.timeout  # google-auth would wait 120 s
        return super().request(method, url, *args, **kwargs)


def session(auth: MailboxAuth, timeout: float = 60.0) -> requests.Session:
    """An HTTP session for the token endpoints (verified against ``auth.ca_file`` when set)."""
    return _TokenSession(str(auth.ca_file) if auth.ca_file else True, timeout)


# -- providers ---------------------------------------------------------------------


class MicrosoftAppTokens(CachedTokens):
    """Exchange Online app-only tokens: the client-credentials grant, through msal."""

    label = "microsoft (client credentials)"

    def __init__(self, auth: MailboxAuth, *, timeout: float, clock: Callable[[], float] = time.time):
        super().__init__(clock=clock)
        self.auth = auth
        self.timeout = timeout
        self.authority = f"{(auth.authority_host or MICROSOFT_AUTHORITY_HOST).rstrip('/')}/{auth.tenant_id}"
        self._app: Any = None
        self._secret: str | None = None

    def _client(self) -> Any:
        import msal

        secret = self.auth.read_client_secret()
        if self._app is None or secret != self._secret:  # a rotated secret file needs a new client
            try:
                self._app = msal.ConfidentialClientApplication(
                    self.auth.client_id,
                    client_credential=secret,
                    authority=self.authority,
                    # The tenant discovery that follows validates the authority;
                    # instance discovery would only work for Microsoft's own hosts.
                    instance_discovery=False,
                    http_client=session(self.auth, self.timeout),
                )
            except ValueError:
                # msal's ValueError: the authority's OpenID discovery answered 4xx (no such tenant).
                raise TokenRefused(
                    f"tenant_id {self.auth.tenant_id!r} was not found at {self.authority}: use the Directory (tenant) ID "
                    "from the app registration's Overview page"
                ) from None
            except requests.RequestException as exc:
                raise TokenUnavailable(f"cannot reach {self.authority}: {type(exc).__name__}") from None
            self._secret = secret
        return self._app

    def _fetch(self) -> tuple[str, float]:
        app = self._client()
        # Our own cache decides when to refresh; msal's would hand back the token just refused.
        app.remove_tokens_for_client()
        try:
            result = app.acquire_token_for_client(scopes=[self.auth.effective_scope])
        except requests.RequestException as exc:
            raise TokenUnavailable(f"cannot reach {self.authority}: {type(exc).__name__}") from None
        if "access_token" not in result:
            raise refused("microsoft", result, grant="client_credentials")
        log.info("oauth_token_obtained", provider="microsoft", expires_in=int(result.get("expires_in", 0)))
        return result["access_token"], float(result.get("expires_in") or 3600)


class GoogleServiceAccountTokens(CachedTokens):
    """Gmail tokens for ``subject`` from a service account with domain-wide delegation."""

    label = "google (service account, domain-wide delegation)"

    def __init__(self, auth: MailboxAuth, subject: str, *, timeout: float, clock: Callable[[], float] = time.time):
        super().__init__(clock=clock)
        self.auth = auth
        self.subject = subject
        self.timeout = timeout

    def _fetch(self) -> tuple[str, float]:
        from google.oauth2 import service_account

        try:
            info = self.auth.read_service_account()  # re-read: a replaced key file is picked up
        except ValueError as exc:
            raise TokenRefused(str(exc)) from None
        credentials = service_account.Credentials.from_service_account_info(info, scopes=[self.auth.effective_scope])
        credentials = credentials.with_subject(self.subject)
        if self.auth.token_url:
            credentials = credentials.with_token_uri(self.auth.token_url)
        _google_refresh(credentials, self.auth, self.timeout, grant="service_account", client_id=info.get("client_id"))
        return credentials.token, _seconds_until(credentials.expiry)


class GoogleRefreshTokens(CachedTokens):
    """Gmail tokens from a stored refresh token (an OAuth client of type desktop app)."""

    label = "google (refresh token)"

    def __init__(self, auth: MailboxAuth, name: str, *, timeout: float, clock: Callable[[], float] = time.time):
        super().__init__(clock=clock)
        self.auth = auth
        self.name = name
        self.timeout = timeout

    def _fetch(self) -> tuple[str, float]:
        from google.oauth2.credentials import Credentials

        stored = read_refresh_token(self.auth, self.name)
        credentials = Credentials(
            None,
            refresh_token=stored,
            token_uri=self.auth.token_url or GOOGLE_TOKEN_URL,
            client_id=self.auth.client_id,
            client_secret=self.auth.read_client_secret(),
            scopes=[self.auth.effective_scope],
        )
        _google_refresh(credentials, self.auth, self.timeout, grant="refresh_token", name=self.name)
        if credentials.refresh_token and credentials.refresh_token != stored:
            save_refresh_token(self.auth, credentials.refresh_token)
        return credentials.token, _seconds_until(credentials.expiry)


class RefreshTokenGrant(CachedTokens):
    """Any OAuth2 server: the refresh-token grant (RFC 6749 section 6) at ``token_url``."""

    label = "generic (refresh token)"

    def __init__(self, auth: MailboxAuth, name: str, *, timeout: float, clock: Callable[[], float] = time.time):
        super().__init__(clock=clock)
        self.auth = auth
        self.name = name
        self.timeout = timeout
        self._session = session(auth, timeout)

    def _fetch(self) -> tuple[str, float]:
        stored = read_refresh_token(self.auth, self.name)
        form = {"grant_type": "refresh_token", "refresh_token": stored, "client_id": self.auth.client_id or ""}
        secret = self.auth.read_client_secret()
        if secret is not None:
            form["client_secret"] = secret
        if self.auth.effective_scope:
            form["scope"] = self.auth.effective_scope
        body = post_token(self._session, self.auth.token_url or "", form, self.timeout, provider="generic", grant="refresh_token", name=self.name)
        rotated = body.get("refresh_token")
        if rotated and rotated != stored:
            save_refresh_token(self.auth, rotated)
        log.info("oauth_token_obtained", provider="generic", expires_in=int(body.get("expires_in") or 0))
        return body["access_token"], float(body.get("expires_in") or 3600)


# -- shared plumbing -----------------------------------------------------------------


def post_form(http: requests.Session, url: str, form: dict[str, str], timeout: float) -> tuple[int, dict[str, Any] | None]:
    """POST an OAuth form; (HTTP status, JSON object or None). Unreachable: TokenUnavailable."""
    try:
        response = http.post(url, data=form, headers={"Accept": "application/json"}, timeout=timeout)
    except requests.RequestException as exc:
        raise TokenUnavailable(f"cannot reach {url}: {type(exc).__name__}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    return response.status_code, body if isinstance(body, dict) else None


def post_token(
    http: requests.Session, url: str, form: dict[str, str], timeout: float, *, provider: str, grant: str, name: str | None = None
) -> dict[str, Any]:
    """POST a token request; the JSON body on success, TokenRefused/TokenUnavailable otherwise."""
    status, body = post_form(http, url, form, timeout)
    if status == 200 and body is not None and body.get("access_token"):
        return body
    if status >= 500 or body is None or not body.get("error"):
        raise TokenUnavailable(f"the token endpoint {url} answered HTTP {status} without an OAuth error")
    raise refused(provider, body, grant=grant, name=name)


def read_refresh_token(auth: MailboxAuth, name: str) -> str:
    """The stored refresh token, read now (``commsync auth login`` may have replaced it)."""
    assert auth.refresh_token_file is not None
    path = state_path(auth.refresh_token_file)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    except OSError as exc:
        raise TokenRefused(f"cannot read refresh_token_file {path}: {exc.strerror or exc}") from None
    if not value:
        raise TokenRefused(f"no refresh token in {path}: run `commsync auth login {name}` to sign in")
    return value


def save_refresh_token(auth: MailboxAuth, value: str) -> None:
    """Write a (rotated) refresh token back, atomically and with mode 0600."""
    assert auth.refresh_token_file is not None
    path = state_path(auth.refresh_token_file)
    try:
        write_secret_file(path, value)
    except OSError as exc:
        # The new token is still good for this process; the next start would need a new sign-in.
        log.error("refresh_token_not_saved", file=str(path), error=exc.strerror or str(exc))
        return
    log.info("refresh_token_saved", file=str(path))


def _google_refresh(credentials: Any, auth: MailboxAuth, timeout: float, *, grant: str, name: str | None = None, client_id: str | None = None) -> None:
    from google.auth import exceptions
    from google.auth.transport.requests import Request

    try:
        credentials.refresh(Request(session(auth, timeout)))
    except exceptions.RefreshError as exc:
        body = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {"error": "", "error_description": str(exc.args[0] if exc.args else exc)}
        if getattr(exc, "retryable", False):
            raise TokenUnavailable(f"Google's token endpoint failed: {_first_line(body.get('error_description') or body.get('error') or '')}") from None
        raise refused("google", body, grant=grant, name=name, client_id=client_id) from None
    except exceptions.TransportError as exc:
        raise TokenUnavailable(f"cannot reach Google's token endpoint: {type(exc.__cause__ or exc).__name__}") from None
    log.info("oauth_token_obtained", provider="google", grant=grant, expires_in=int(_seconds_until(credentials.expiry)))


def _seconds_until(expiry: datetime | None) -> float:
    if expiry is None:
        return 3600.0
    if expiry.tzinfo is None:  # google-auth keeps naive UTC
        expiry = expiry.replace(tzinfo=UTC)
    return max(0.0, (expiry - datetime.now(UTC)).total_seconds())


def _first_line(text: str, limit: int = 200) -> str:
    return (text.strip().splitlines() or [""])[0][:limit]


# -- what to fix -------------------------------------------------------------------

_RELOGIN = "the refresh token has expired or was revoked: run `commsync auth login {name}` to sign in again"

# Entra ID (AADSTS) codes -> what the administrator has to change.
_AADSTS = {
    7000215: "the client secret is wrong: use the secret's Value (not its Secret ID) from the app registration's Certificates & secrets",
    7000222: "the client secret has expired: create a new one under the app registration's Certificates & secrets",
    700016: "the app (client_id) is not known in this tenant: check tenant_id and client_id, and that an administrator consented to the app in this tenant",
    90002: "tenant_id is not a known tenant: use the Directory (tenant) ID from the app registration's Overview page",
    900023: "tenant_id is not a valid tenant ID or domain",
    90072: "wrong tenant: the app belongs to another tenant than tenant_id",
    65001: "admin consent is missing: grant admin consent for IMAP.AccessAsApp under the app registration's API permissions",
    650051: "admin consent is missing: grant admin consent for IMAP.AccessAsApp under the app registration's API permissions",
    500011: "the Office 365 Exchange Online resource is missing in this tenant: check the scope and that the tenant has Exchange Online",
    70011: "the scope is not valid: app-only IMAP needs https://outlook.office365.com/.default",
    7000112: "the app is disabled in this tenant: enable it under Enterprise applications",
    700024: _RELOGIN,
    70008: _RELOGIN,
    700082: _RELOGIN,
    50173: _RELOGIN,
    50076: "the account needs multi-factor authentication: run `commsync auth login {name}` to sign in again",
}

_IMAP_REFUSAL = {
    "microsoft": (
        "Exchange Online refused a fresh app-only token for {user}: check that the app has the IMAP.AccessAsApp application "
        "permission with admin consent, that the Exchange service principal exists (New-ServicePrincipal) and has FullAccess "
        "to this mailbox (Add-MailboxPermission), and that IMAP is enabled for the mailbox"
    ),
    "google": (
        "Gmail refused a fresh token for {user}: check that domain-wide delegation (or the consent) covers "
        "https://mail.google.com/ and that IMAP is enabled for the user"
    ),
    "generic": "the IMAP server refused a fresh token for {user}: check that the token belongs to this mailbox and carries the scope the server needs",
}


def imap_refusal(provider: str, user: str) -> str:
    """What to fix when the IMAP server refuses a token the provider has just issued."""
    return _IMAP_REFUSAL.get(provider, _IMAP_REFUSAL["generic"]).format(user=user)


def explain(
    provider: str, error: str, description: str = "", codes: Iterable[int] = (), *, grant: str, name: str | None = None, client_id: str | None = None
) -> str:
    """Translate an OAuth error response into what the administrator has to fix."""
    name = name or "NAME"
    for code in codes or ():
        if code in _AADSTS:
            return _AADSTS[code].format(name=name)
    text = description.lower()
    if grant == "service_account":
        if error == "unauthorized_client":
            return (
                f"domain-wide delegation is missing: in the Google Admin console (Security > Access and data control > API controls > "
                f"Domain-wide delegation) add client ID {client_id or '(the service account client_id)'} with scope https://mail.google.com/"
            )
        if error == "invalid_grant" and ("email" in text or "user" in text):
            return "the mailbox user does not exist in the Google Workspace domain: username must be the user's primary address"
        if error == "invalid_grant":
            return "the service account key was refused (deleted key, or this machine's clock is wrong): create a new JSON key"
    if error == "invalid_grant" and grant in ("refresh_token", "device_code", "authorization_code"):
        return _RELOGIN.format(name=name)
    if error == "invalid_client":
        return "client_id or the client secret is wrong (or the client was deleted): check both in the provider's console"
    if error == "unauthorized_client":
        return "this client may not use this grant: check the app/client type (a confidential app with a secret for microsoft) and tenant_id"
    if error == "invalid_scope":
        return "the scope is not allowed for this client: check scope (and that the API permission was added)"
    if error in ("access_denied", "consent_required", "interaction_required"):
        return "consent is missing: an administrator has to grant the app access (admin consent), then run `commsync check`"
    return f"the token endpoint refused: {error or 'unknown error'}"


def refused(provider: str, body: dict[str, Any], *, grant: str, name: str | None = None, client_id: str | None = None) -> TokenRefused:
    """A TokenRefused for an OAuth error body: what to fix, then what the provider said."""
    error = str(body.get("error") or "")
    description = str(body.get("error_description") or "")
    codes = [c for c in body.get("error_codes") or () if isinstance(c, int)]
    hint = explain(provider, error, description, codes, grant=grant, name=name, client_id=client_id)
    said = _first_line(f"{error}: {description}" if description else error)
    return TokenRefused(f"{hint} ({provider} said: {said})")
