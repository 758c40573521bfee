"""A small OAuth2 authorization server for tests, on 127.0.0.1 only.

It plays the identity provider's part for the real protocol tests: it issues
access tokens the way Microsoft Entra, Google and a plain RFC 6749 server do,
and answers the token introspection that Dovecot's ``oauth2`` passdb asks for
when a client logs in with SASL XOAUTH2. So a test can go all the way: the
daemon's token provider -> this server -> IMAP AUTHENTICATE -> Dovecot ->
introspection here.

* HTTPS (``base_url``) for the clients, with a private CA (``ca_file``), since
  msal only accepts https authorities; plain HTTP (``introspection_url``) for
  Dovecot, which would otherwise need its own TLS client settings.
* Microsoft-like, per tenant: ``/{tenant}/v2.0/.well-known/openid-configuration``
  and ``/{tenant}/oauth2/v2.0/token`` (client credentials), errors carrying
  AADSTS codes.
* ``/token``: refresh-token grant (optionally rotating the refresh token),
  the JWT-bearer grant of Google service accounts (the assertion's RS256
  signature is checked with the account's public key, ``sub`` must be a
  user of the domain and the scope must be delegated), the device-code grant
  and the authorization-code grant (with PKCE).
* ``/device/code`` (RFC 8628) and ``/authorize`` (redirects at once to the
  client's loopback ``redirect_uri``, as a browser would after the user
  agreed).

App-only tokens are not bound to a user, but Dovecot compares the
introspected ``username`` with the login name; so an app's client-credentials
token introspects as the one mailbox the app was granted (register one app
per mailbox).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

MS_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
# google-auth signs service-account assertions for Google's token endpoint,
# whatever token_uri the request goes to.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


@dataclass
class App:
    """A registered client (an Entra app registration, an OAuth client)."""

    client_id: str
    secret: str | None
    tenant: str | None = None
    mailboxes: set[str] = field(default_factory=set)
    consented: bool = True


@dataclass
class ServiceAccount:
    email: str
    public_key: Any
    delegated_scopes: set[str]


@dataclass
class Access:
    user: str | None
    client_id: str
    active: bool = True


@dataclass
class Device:
    client_id: str
    scope: str
    user_code: str
    user: str | None = None
    polls: int = 0


class OAuthServer:
    """See the module docstring. ``start()``/``stop()``, or use as a context manager."""

    host = "127.0.0.1"

    def __init__(self, *, token_lifetime: int = 3600):
        self.token_lifetime = token_lifetime
        self.rotate_refresh_tokens = False
        self.users: set[str] = set()
        self.tenants: set[str] = set()
        self.apps: dict[str, App] = {}
        self.service_accounts: dict[str, ServiceAccount] = {}
        self.refresh_tokens: dict[str, tuple[str, str]] = {}  # token -> (client_id, user)
        self.access_tokens: dict[str, Access] = {}
        self.devices: dict[str, Device] = {}
        self.codes: dict[str, tuple[str, str, str, str | None]] = {}  # code -> client, user, redirect, challenge
        self.authorize_as: str | None = None
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.introspections: list[str] = []
        self.issued: list[str] = []  # every token ever handed out (to prove none is logged)
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.tmpdir: str | None = None
        self.ca_file: str | None = None
        self.port = self.http_port = 0

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> OAuthServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> OAuthServer:
        self.tmpdir = tempfile.mkdtemp(prefix="oauth-")
        os.chmod(self.tmpdir, 0o755)
        cert, key = self._make_certs()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        https = self._serve(context)
        http = self._serve(None)
        self.port, self.http_port = https.server_address[1], http.server_address[1]
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _serve(self, context: ssl.SSLContext | None) -> ThreadingHTTPServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        server = ThreadingHTTPServer((self.host, 0), Handler)
        server.daemon_threads = True
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, name="oauth-server", daemon=True).start()
        self._servers.append(server)
        return server

    def _make_certs(self) -> tuple[str, str]:
        assert self.tmpdir is not None
        now = _dt.datetime.now(_dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "commsync test OAuth CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_file = os.path.join(self.tmpdir, "ca.pem")
        cert_file, key_file = os.path.join(self.tmpdir, "server.pem"), os.path.join(self.tmpdir, "server.key")
        with open(self.ca_file, "wb") as f:
            f.write(ca.public_bytes(serialization.Encoding.PEM))
        with open(cert_file, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_file, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return cert_file, key_file

    # -- addresses ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def device_url(self) -> str:
        return f"{self.base_url}/device/code"

    @property
    def authorize_url(self) -> str:
        return f"{self.base_url}/authorize"

    @property
    def introspection_url(self) -> str:
        return f"http://{self.host}:{self.http_port}/introspect"

    # -- what the tests set up -------------------------------------------------------

    def add_app(
        self, client_id: str | None = None, *, secret: str | None = None, tenant: str | None = None, mailboxes: tuple[str, ...] = (), consented: bool = True
    ) -> App:
        """Register a client; with ``tenant`` it is an Entra app registration there."""
        app = App(client_id or f"app-{secrets.token_hex(4)}", secret, tenant, set(mailboxes), consented)
        with self._lock:
            self.apps[app.client_id] = app
            if tenant:
                self.tenants.add(tenant)
            self.users.update(mailboxes)
        return app

    def issue_refresh_token(self, client_id: str, user: str) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self.issued.append(token)
            self.users.add(user)
            self.refresh_tokens[token] = (client_id, user)
        return token

    def revoke(self, refresh_token: str) -> None:
        with self._lock:
            self.refresh_tokens.pop(refresh_token, None)

    def expire_access_tokens(self) -> int:
        """Mark every issued access token inactive (as if its lifetime had passed)."""
        with self._lock:
            live = [a for a in self.access_tokens.values() if a.active]
            for access in live:
                access.active = False
        return len(live)

    def add_service_account(self, project: str = "commsync-test", *, delegated_scopes: tuple[str, ...] = (GOOGLE_MAIL_SCOPE,)) -> dict[str, Any]:
        """Create a service account (fresh RSA key); return its JSON key file's content."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = f"commsync-{secrets.token_hex(3)}@{project}.iam.gserviceaccount.com"
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
        client_id = str(secrets.randbits(60))
        with self._lock:
            self.service_accounts[email] = ServiceAccount(email, key.public_key(), set(delegated_scopes))
        return {
            "type": "service_account",
            "project_id": project,
            "private_key_id": secrets.token_hex(20),
            "private_key": pem,
            "client_email": email,
            "client_id": client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "https://oauth2.googleapis.com/token",
        }

    def add_user(self, user: str) -> None:
        with self._lock:
            self.users.add(user)

    def approve_devices(self, user: str) -> None:
        """Approve every pending device code as ``user`` (the person at the browser)."""
        with self._lock:
            for device in self.devices.values():
                device.user = user

    def grants(self, kind: str) -> int:
        """How many token requests of one grant type the server answered."""
        with self._lock:
            return sum(1 for method, path, form in self.requests if form.get("grant_type") == kind)

    # -- protocol ------------------------------------------------------------------

    def _issue(self, client_id: str, user: str | None) -> dict[str, Any]:
        token = "at-" + secrets.token_urlsafe(24)
        self.issued.append(token)
        self.access_tokens[token] = Access(user, client_id)
        return {"token_type": "Bearer", "expires_in": self.token_lifetime, "access_token": token}

    def handle(self, method: str, path: str, query: dict[str, str], form: dict[str, str]) -> tuple[int, dict[str, Any] | str, dict[str, str]]:
        with self._lock:
            self.requests.append((method, path, form))
            parts = [p for p in path.split("/") if p]
            if path == "/introspect":
                return self._introspect(form.get("token", ""))
            if len(parts) == 4 and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
                return self._openid(parts[0])
            if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
                return self._token(form, tenant=parts[0])
            if path == "/token":
                return self._token(form, tenant=None)
            if path == "/device/code":
                return self._device(form)
            if path == "/authorize":
                return self._authorize(query)
            return 404, {"error": "not_found"}, {}

    def _introspect(self, token: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        self.introspections.append(token)
        access = self.access_tokens.get(token)
        if access is None or not access.active or access.user is None:
            return 200, {"active": False}, {}
        return 200, {"active": True, "username": access.user, "client_id": access.client_id}, {}

    def _openid(self, tenant: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        if tenant not in self.tenants:
            return 400, _aad("invalid_tenant", 90002, f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID."), {}
        base = f"{self.base_url}/{tenant}"
        return 200, {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "token_endpoint_auth_methods_supported": ["client_secret_post"],
        }, {}

    def _token(self, form: dict[str, str], tenant: str | None) -> tuple[int, dict[str, Any], dict[str, str]]:
        grant = form.get("grant_type")
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._jwt_bearer(form.get("assertion", ""))
        app = self.apps.get(form.get("client_id", ""))
        if tenant is not None and tenant not in self.tenants:
            return 400, _aad("invalid_request", 90002, f"Tenant '{tenant}' not found."), {}
        if app is None or (tenant is not None and app.tenant != tenant):
            if tenant is not None:
                return 400, _aad("unauthorized_client", 700016, f"Application with identifier '{form.get('client_id')}' was not found in the directory '{tenant}'."), {}
            return 401, {"error": "invalid_client", "error_description": "The OAuth client was not found."}, {}
        if app.secret is not None and form.get("client_secret") != app.secret:
            if tenant is not None:
                return 401, _aad("invalid_client", 7000215, "Invalid client secret provided."), {}
            return 401, {"error": "invalid_client", "error_description": "Unauthorized"}, {}
        if grant == "client_credentials":
            if form.get("scope") != MS_SCOPE:
                return 400, _aad("invalid_scope", 70011, f"The provided value for scope {form.get('scope')} is not valid."), {}
            # Without admin consent Entra still issues a token, just without the
            # IMAP.AccessAsApp role: Exchange is the one that refuses it.
            user = sorted(app.mailboxes)[0] if app.mailboxes and app.consented else None
            return 200, self._issue(app.client_id, user), {}
        if grant == "refresh_token":
            held = self.refresh_tokens.get(form.get("refresh_token", ""))
            if held is None or held[0] != app.client_id:
                return 400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}, {}
            body = self._issue(app.client_id, held[1])
            if self.rotate_refresh_tokens:
                del self.refresh_tokens[form["refresh_token"]]
                body["refresh_token"] = "rt-" + secrets.token_urlsafe(24)
                self.issued.append(body["refresh_token"])
                self.refresh_tokens[body["refresh_token"]] = held
            return 200, body, {}
        if grant == "urn:ietf:params:oauth:grant-type:device_code":
            device = self.devices.get(form.get("device_code", ""))
            if device is None or device.client_id != app.client_id:
                return 400, {"error": "expired_token"}, {}
            device.polls += 1
            if device.user is None:
                return 400, {"error": "authorization_pending"}, {}
            del self.devices[form["device_code"]]
            return 200, self._with_refresh(app.client_id, device.user), {}
        if grant == "authorization_code":
            held_code = self.codes.pop(form.get("code", ""), None)
            if held_code is None or held_code[0] != app.client_id or held_code[2] != form.get("redirect_uri"):
                return 400, {"error": "invalid_grant", "error_description": "Malformed auth code."}, {}
            challenge = held_code[3]
            verifier = form.get("code_verifier", "")
            if challenge is not None and _s256(verifier) != challenge:
                return 400, {"error": "invalid_grant", "error_description": "Invalid code verifier."}, {}
            return 200, self._with_refresh(app.client_id, held_code[1]), {}
        return 400, {"error": "unsupported_grant_type"}, {}

    def _with_refresh(self, client_id: str, user: str) -> dict[str, Any]:
        body = self._issue(client_id, user)
        body["refresh_token"] = "rt-" + secrets.token_urlsafe(24)
        self.issued.append(body["refresh_token"])
        self.refresh_tokens[body["refresh_token"]] = (client_id, user)
        return body

    def _jwt_bearer(self, assertion: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            issuer = jwt.decode(assertion, options={"verify_signature": False})["iss"]
            account = self.service_accounts[issuer]
            claims = jwt.decode(
                assertion, account.public_key, algorithms=["RS256"], audience=[GOOGLE_TOKEN_AUDIENCE, self.token_url]
            )
        except (jwt.PyJWTError, KeyError):
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, {}
        scopes = set(str(claims.get("scope", "")).split())
        if claims.get("sub") not in self.users:
            return 400, {"error": "invalid_grant", "error_description": "Invalid email or User ID"}, {}
        if not scopes or not scopes <= account.delegated_scopes:
            return 401, {
                "error": "unauthorized_client",
                "error_description": "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
            }, {}
        return 200, self._issue(account.email, claims["sub"]), {}

    def _device(self, form: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        if form.get("client_id") not in self.apps:
            return 401, {"error": "invalid_client"}, {}
        code, user_code = secrets.token_urlsafe(16), secrets.token_hex(4).upper()
        self.devices[code] = Device(form["client_id"], form.get("scope", ""), user_code)
        return 200, {
            "device_code": code,
            "user_code": user_code,
            "verification_uri": f"{self.base_url}/device",
            "expires_in": 600,
            "interval": 0,
        }, {}

    def _authorize(self, query: dict[str, str]) -> tuple[int, str, dict[str, str]]:
        redirect = query.get("redirect_uri", "")
        if query.get("client_id") not in self.apps or not redirect.startswith("http://127.0.0.1:") or self.authorize_as is None:
            return 400, "bad authorization request", {}
        code = secrets.token_urlsafe(16)
        challenge = query.get("code_challenge") if query.get("code_challenge_method") == "S256" else None
        self.codes[code] = (query["client_id"], self.authorize_as, redirect, challenge)
        location = redirect + "?" + urlencode({"code": code, "state": query.get("state", "")})
        return 302, "", {"Location": location}


def _aad(error: str, code: int, text: str) -> dict[str, Any]:
    return {"error": error, "error_description": f"AADSTS{code}: {text}", "error_codes": [code]}


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class _Handler(BaseHTTPRequestHandler):
    server_owner: OAuthServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _answer(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        form = {k: v[-1] for k, v in parse_qs(body).items()}
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        status, payload, headers = self.server_owner.handle(method, url.path, query, form)
        data = (json.dumps(payload) if isinstance(payload, dict) else payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if isinstance(payload, dict) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true (for the device-flow tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
