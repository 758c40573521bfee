"""`commsync auth login NAME`: sign in once, keep the refresh token (mode 0600).

For mailboxes whose OAuth2 access rests on a person's consent (google with a
refresh token, generic), not for app-only ones (microsoft, google service
accounts: nothing to sign in). Two flows:

* device code (RFC 8628) when ``auth.device_authorization_url`` is set: the
  command prints a URL and a code to enter on any device with a browser;
* otherwise the browser flow for installed apps (RFC 8252, authorization code
  with PKCE): the command prints a URL and waits for the browser to come back
  to a one-shot listener on 127.0.0.1. Google needs this one: its device flow
  does not grant the Gmail scope. On a headless server, forward the port with
  ``ssh -L``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, urlencode, urlsplit

import structlog

from commsync.config.auth import GOOGLE_AUTHORIZATION_URL, GOOGLE_TOKEN_URL, MailboxAuth
from commsync.config.models import MailboxConfig, Settings
from commsync.config.secrets import state_path, write_secret_file
from commsync.connectors.oauth import TokenUnavailable, explain, post_form, session

log = structlog.get_logger(__name__)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
BROWSER_WAIT = 300.0


class SignInError(Exception):
    """The sign-in did not produce a refresh token; the message says why."""


async def login_command(settings: Settings, args: Any) -> int:
    """Handler of `commsync auth login NAME`."""
    mailbox = next((m for m in settings.mailboxes if m.name == args.name), None)
    if mailbox is None:
        print(f"commsync: no mailbox named {args.name!r} in {args.config}", file=sys.stderr)
        return 2
    auth = mailbox.auth
    if auth.method != "oauth2" or auth.refresh_token_file is None:
        what = "a password" if auth.method != "oauth2" else f"app-only access ({auth.provider})"
        print(f"commsync: mailbox {mailbox.name} signs in with {what}; there is nothing to log in. Run `commsync check`.", file=sys.stderr)
        return 2
    try:
        refresh_token = await asyncio.to_thread(sign_in, mailbox, sys.stdout)
        path = state_path(auth.refresh_token_file)
        save_refresh_token(path, refresh_token)
    except (SignInError, TokenUnavailable) as exc:
        print(f"commsync: sign-in for {mailbox.name} failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"commsync: cannot write {state_path(auth.refresh_token_file)}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    log.info("refresh_token_saved", source=mailbox.name, file=str(path))
    print(f"Saved the refresh token for {mailbox.name} to {path} (mode 0600). Next: commsync check")
    return 0


def save_refresh_token(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` (0600, atomically), owned by whoever owns its directory.

    Run by root into the service's state directory (owned by its dynamic user),
    the file must become the service's: systemd re-owns the directory at start
    only when the directory itself has the wrong owner, not what root put in it.
    """
    write_secret_file(path, token)
    if os.geteuid() == 0:
        directory = path.parent.stat()
        if directory.st_uid != 0:
            os.chown(path, directory.st_uid, directory.st_gid)


def sign_in(mailbox: MailboxConfig, out: TextIO, *, browse: Callable[[str], Any] | None = None) -> str:
    """Run the interactive flow for ``mailbox``; return the new refresh token.

    Instructions go to ``out``. ``browse(url)``, when given, is called with the
    URL the person has to open (tests pass a client that plays the browser).
    """
    auth = mailbox.auth
    timeout = mailbox.timeout.total_seconds()
    if auth.device_authorization_url:
        return device_flow(auth, out, timeout=timeout, browse=browse, name=mailbox.name)
    authorization_url = auth.authorization_url or (GOOGLE_AUTHORIZATION_URL if auth.provider == "google" else None)
    if authorization_url is None:
        raise SignInError("set auth.device_authorization_url (device code) or auth.authorization_url (browser) for this mailbox")
    return browser_flow(auth, authorization_url, out, timeout=timeout, browse=browse, name=mailbox.name, google=auth.provider == "google")


def _token_url(auth: MailboxAuth) -> str:
    return auth.token_url or GOOGLE_TOKEN_URL


def _client_form(auth: MailboxAuth) -> dict[str, str]:
    form = {"client_id": auth.client_id or ""}
    secret = auth.read_client_secret()
    if secret is not None:
        form["client_secret"] = secret
    return form


def _refresh_token(body: dict[str, Any], auth: MailboxAuth) -> str:
    token = body.get("refresh_token")
    if not token:
        raise SignInError(
            "the provider issued no refresh token: ask for offline access "
            "(Microsoft: add offline_access to scope; Google: the flow asks with access_type=offline)"
        )
    return str(token)


def device_flow(auth: MailboxAuth, out: TextIO, *, timeout: float, browse: Callable[[str], Any] | None, name: str) -> str:
    """RFC 8628: show a code, poll the token endpoint until the person has entered it."""
    http = session(auth, timeout)
    status, body = post_form(http, auth.device_authorization_url or "", {**_client_form(auth), "scope": auth.effective_scope}, timeout)
    if status != 200 or body is None or "device_code" not in body:
        error = (body or {}).get("error", f"HTTP {status}")
        raise SignInError(f"the device authorization endpoint refused: {explain(auth.provider or 'generic', str(error), str((body or {}).get('error_description', '')), grant='device_code', name=name)}")
    uri = body.get("verification_uri_complete") or body.get("verification_uri") or body.get("verification_url")
    out.write(f"To sign in, open {uri} in a browser and enter the code {body['user_code']}\n")
    out.flush()
    if browse is not None:
        browse(str(uri))
    interval = float(body.get("interval", 5))
    deadline = time.monotonic() + float(body.get("expires_in", 900))
    form = {**_client_form(auth), "grant_type": DEVICE_GRANT, "device_code": body["device_code"]}
    while time.monotonic() < deadline:
        time.sleep(interval)
        status, answer = post_form(http, _token_url(auth), form, timeout)
        answer = answer or {}
        if status == 200 and answer.get("access_token"):
            return _refresh_token(answer, auth)
        error = str(answer.get("error", ""))
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        if error == "access_denied":
            raise SignInError("the sign-in was declined in the browser")
        if error == "expired_token":
            raise SignInError("the code expired before it was entered: run the command again")
        raise SignInError(explain(auth.provider or "generic", error or f"HTTP {status}", str(answer.get("error_description", "")), grant="device_code", name=name))
    raise SignInError("the code expired before it was entered: run the command again")


def browser_flow(
    auth: MailboxAuth, authorization_url: str, out: TextIO, *, timeout: float, browse: Callable[[str], Any] | None, name: str, google: bool
) -> str:
    """RFC 8252 with PKCE: the browser comes back to a one-shot listener on 127.0.0.1."""
    verifier = secrets.token_urlsafe(48)
    state = secrets.token_urlsafe(16)
    listener = _Loopback()
    redirect_uri = f"http://127.0.0.1:{listener.port}/"
    params = {
        "response_type": "code",
        "client_id": auth.client_id or "",
        "redirect_uri": redirect_uri,
        "scope": auth.effective_scope,
        "state": state,
        "code_challenge": base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode(),
        "code_challenge_method": "S256",
    }
    if google:
        # Without these Google issues no refresh token (or only on the first consent).
        params.update(access_type="offline", prompt="consent")
    url = authorization_url + ("&" if "?" in authorization_url else "?") + urlencode(params)
    out.write(
        "Open this URL in a browser on this machine and sign in as the mailbox's user\n"
        f"(on a server: ssh -L {listener.port}:127.0.0.1:{listener.port} to it first):\n\n{url}\n\n"
    )
    out.flush()
    try:
        if browse is not None:
            threading.Thread(target=browse, args=(url,), daemon=True).start()
        query = listener.wait(BROWSER_WAIT)
    finally:
        listener.close()
    if query is None:
        raise SignInError(f"no answer from the browser within {int(BROWSER_WAIT)} s")
    if query.get("state") != state:
        raise SignInError("the browser came back with a different state (a stale or foreign sign-in): run the command again")
    if "code" not in query:
        raise SignInError(f"the sign-in was declined: {query.get('error', 'no code')} {query.get('error_description', '')}".strip())
    form = {**_client_form(auth), "grant_type": "authorization_code", "code": query["code"], "redirect_uri": redirect_uri, "code_verifier": verifier}
    status, body = post_form(session(auth, timeout), _token_url(auth), form, timeout)
    if status != 200 or body is None or not body.get("access_token"):
        body = body or {}
        raise SignInError(explain(auth.provider or "generic", str(body.get("error", f"HTTP {status}")), str(body.get("error_description", "")), grant="authorization_code", name=name))
    return _refresh_token(body, auth)


class _Loopback:
    """A one-shot HTTP listener on 127.0.0.1 for the authorization redirect."""

    def __init__(self) -> None:
        result: dict[str, Any] = {}
        done = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # the query holds the code
                pass

            def do_GET(self) -> None:
                query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
                if "code" not in query and "error" not in query:  # favicon and friends
                    self.send_error(404)
                    return
                result.update(query)
                text = b"commsync: signed in. You can close this window.\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
                done.set()

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self._server.timeout = 0.5
        self._result, self._done = result, done
        self.port = self._server.server_address[1]

    def wait(self, seconds: float) -> dict[str, str] | None:
        deadline = time.monotonic() + seconds
        while not self._done.is_set() and time.monotonic() < deadline:
            self._server.handle_request()
        return dict(self._result) if self._done.is_set() else None

    def close(self) -> None:
        self._server.server_close()
