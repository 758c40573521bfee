"""OAuth2 (SASL XOAUTH2) mailboxes against a real Dovecot that checks each token with the test OAuth server.

The whole chain is real: the token providers (msal, google-auth, a plain
refresh grant) ask ``tests/oauth_server.py`` over HTTPS for a token, the
connector logs in with AUTHENTICATE XOAUTH2, and Dovecot's ``oauth2`` passdb
asks the same server whether that token is active and whose it is.
"""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest
import requests
import structlog

from commsync.config import settings_from_dict
from commsync.connectors.oauth import REFRESH_MARGIN, RefreshTokenGrant, TokenRefused, token_provider
from commsync.daemon import app, logs
from commsync.daemon.auth_cli import sign_in
from commsync.daemon.cli import main
from commsync.daemon.runner import Runner, StoreSink

from dovecot import DovecotServer, require_dovecot
from mailgen import message
from oauth_server import GOOGLE_MAIL_SCOPE, OAuthServer, wait_until


@pytest.fixture(scope="module")
def oauth():
    with OAuthServer() as server:
        yield server


@pytest.fixture(scope="module")
def oauth_dovecot(oauth):
    """A Dovecot of its own (the shared one stays password-only) that accepts XOAUTH2 tokens from ``oauth``."""
    require_dovecot()
    with DovecotServer(oauth2_introspection_url=oauth.introspection_url) as server:
        yield server


@pytest.fixture(autouse=True)
def _no_rotation(oauth):
    oauth.rotate_refresh_tokens = False


def box(dovecot, oauth, user, name, auth, **extra):
    auth = {"method": "oauth2", "ca_file": oauth.ca_file, **auth}
    return dovecot.mailbox(user, name=name, password=None, folders=["INBOX"], auth=auth, **extra)


def settings(*boxes):
    return settings_from_dict({"mongodb": {"uri": "memory://"}, "mailboxes": list(boxes), "daemon": {"parse_workers": 1}})


def microsoft(oauth, tmp_path, user, *, granted=True, consented=True, tenant="contoso-tenant"):
    """An Entra app registration allowed to open ``user``'s mailbox; the matching auth: keys."""
    secret = f"secret-{user.name}"
    app_ = oauth.add_app(secret=secret, tenant=tenant, mailboxes=(user.name,) if granted else ("someone-else",), consented=consented)
    secret_file = tmp_path / f"{app_.client_id}.secret"
    secret_file.write_text(secret + "\n")
    return {"provider": "microsoft", "tenant_id": tenant, "client_id": app_.client_id, "client_secret_file": str(secret_file), "authority_host": oauth.base_url}


def generic(oauth, tmp_path, user, *, name="generic"):
    """An OAuth client with a refresh token for ``user``, stored in a file."""
    client = oauth.add_app(secret="generic-secret")
    token_file = tmp_path / f"{name}.token"
    token_file.write_text(oauth.issue_refresh_token(client.client_id, user.name) + "\n")
    token_file.chmod(0o600)
    return {
        "provider": "generic",
        "token_url": oauth.token_url,
        "client_id": client.client_id,
        "client_secret": "generic-secret",
        "refresh_token_file": str(token_file),
        "scope": "imap",
    }


async def sync(cfg, store):
    runner = Runner(app.build_connectors(cfg, None), StoreSink(store), once=True)
    ok = await runner.run()
    return ok, runner


async def test_microsoft_app_only_login_via_msal(oauth, oauth_dovecot, tmp_path, memory_store):
    user = oauth_dovecot.new_user("ms")
    oauth_dovecot.append(user.name, "INBOX", message(1))
    before = oauth.grants("client_credentials")
    ok, runner = await sync(settings(box(oauth_dovecot, oauth, user, "sales", microsoft(oauth, tmp_path, user))), memory_store)
    assert ok, runner.status
    assert await memory_store.records.count_documents({}) == 1
    assert oauth.grants("client_credentials") == before + 1
    # msal found the token endpoint through OpenID discovery at the overridden authority.
    assert any(path == "/contoso-tenant/v2.0/.well-known/openid-configuration" for _, path, _ in oauth.requests)
    assert "XOAUTH2" in oauth_dovecot.log_tail(20)


async def test_expired_token_is_refreshed_once_and_login_retried(oauth, oauth_dovecot, tmp_path, memory_store):
    user = oauth_dovecot.new_user("exp")
    oauth_dovecot.append(user.name, "INBOX", message(1))
    cfg = settings(box(oauth_dovecot, oauth, user, "sales", microsoft(oauth, tmp_path, user)))
    [connector] = app.build_connectors(cfg, None)
    runner = Runner([connector], StoreSink(memory_store), once=True)
    try:
        assert await runner.run_pass(connector) == 1
        grants = oauth.grants("client_credentials")
        # The server now calls the cached token inactive, and drops the session:
        # the next pass logs in again with the cached token, is refused, refreshes, retries.
        assert oauth.expire_access_tokens() >= 1
        oauth_dovecot.doveadm("kick", user.name)
        oauth_dovecot.append(user.name, "INBOX", message(2))
        assert await runner.run_pass(connector) == 1
        assert oauth.grants("client_credentials") == grants + 1
    finally:
        await connector.aclose()
    assert await memory_store.records.count_documents({}) == 2


async def test_revoked_refresh_token_fails_that_mailbox_only(oauth, oauth_dovecot, tmp_path, memory_store):
    good, bad = oauth_dovecot.new_user("good"), oauth_dovecot.new_user("bad")
    oauth_dovecot.append(good.name, "INBOX", message(1))
    oauth_dovecot.append(bad.name, "INBOX", message(2))
    bad_auth = generic(oauth, tmp_path, bad, name="bad")
    oauth.revoke(Path(bad_auth["refresh_token_file"]).read_text().strip())
    cfg = settings(
        box(oauth_dovecot, oauth, good, "good", generic(oauth, tmp_path, good, name="good")),
        box(oauth_dovecot, oauth, bad, "bad", bad_auth),
    )
    ok, runner = await sync(cfg, memory_store)
    assert not ok
    error = runner.status["bad"].last_error
    assert error.startswith("TokenRefused: the refresh token has expired or was revoked")
    assert "commsync auth login bad" in error
    assert runner.status["good"].last_error is None
    assert await memory_store.records.count_documents({}) == 1


async def test_rotated_refresh_token_is_written_back(oauth, oauth_dovecot, tmp_path, memory_store):
    oauth.rotate_refresh_tokens = True
    user = oauth_dovecot.new_user("rot")
    oauth_dovecot.append(user.name, "INBOX", message(1))
    auth = generic(oauth, tmp_path, user)
    token_file = tmp_path / "generic.token"
    token_file.chmod(0o644)
    first = token_file.read_text().strip()
    cfg = settings(box(oauth_dovecot, oauth, user, "rot", auth))
    ok, runner = await sync(cfg, memory_store)
    assert ok, runner.status
    second = token_file.read_text().strip()
    assert second != first and second in oauth.refresh_tokens and first not in oauth.refresh_tokens
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # The saved token is the one that works now.
    oauth_dovecot.append(user.name, "INBOX", message(2))
    ok, runner = await sync(cfg, memory_store)
    assert ok, runner.status
    assert token_file.read_text().strip() not in (first, second)
    assert await memory_store.records.count_documents({}) == 2


@pytest.fixture
def json_logs():
    saved = structlog.get_config()
    logs.configure("debug", json=True)
    yield
    structlog.configure(**saved)


async def test_tokens_and_secrets_never_reach_the_logs(oauth, oauth_dovecot, tmp_path, memory_store, capsys, json_logs):
    oauth.rotate_refresh_tokens = True
    ok_user, revoked_user, ms_user = (oauth_dovecot.new_user(p) for p in ("lg", "lr", "lm"))
    for u in (ok_user, revoked_user, ms_user):
        oauth_dovecot.append(u.name, "INBOX", message(1))
    revoked = generic(oauth, tmp_path, revoked_user, name="revoked")
    oauth.revoke(Path(revoked["refresh_token_file"]).read_text().strip())
    ms = microsoft(oauth, tmp_path, ms_user)
    cfg = settings(
        box(oauth_dovecot, oauth, ok_user, "ok", generic(oauth, tmp_path, ok_user, name="ok")),
        box(oauth_dovecot, oauth, revoked_user, "revoked", revoked),
        box(oauth_dovecot, oauth, ms_user, "ms", ms),
    )
    ok, runner = await sync(cfg, memory_store)
    assert not ok
    err = capsys.readouterr().err
    events = {json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")}
    assert {"oauth_token_obtained", "refresh_token_saved", "source_failed", "batch_stored"} <= events
    secrets_ = [*oauth.issued, "generic-secret", f"secret-{ms_user.name}"]
    assert len(oauth.issued) >= 4
    leaked = [s for s in secrets_ if s in err or any(s in (st.last_error or "") for st in runner.status.values())]
    assert leaked == []


async def test_google_service_account_with_domain_wide_delegation(oauth, oauth_dovecot, tmp_path, memory_store):
    user = oauth_dovecot.new_user("gsa")
    oauth.add_user(user.name)
    oauth_dovecot.append(user.name, "INBOX", message(1))
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(oauth.add_service_account()))
    undelegated = tmp_path / "undelegated.json"
    key = oauth.add_service_account(delegated_scopes=())
    undelegated.write_text(json.dumps(key))
    stranger = oauth_dovecot.new_user("nobody")  # a Dovecot user the Workspace domain does not know

    def google(path):
        return {"provider": "google", "service_account_file": str(path), "token_url": oauth.token_url}

    cfg = settings(
        box(oauth_dovecot, oauth, user, "gmail", google(key_file)),
        box(oauth_dovecot, oauth, user, "nodwd", google(undelegated)),
        box(oauth_dovecot, oauth, stranger, "stranger", google(key_file)),
    )
    ok, runner = await sync(cfg, memory_store)
    assert runner.status["gmail"].last_error is None
    assert await memory_store.records.count_documents({}) == 1
    # The server checked the RS256 signature, sub = the mailbox user and the Gmail scope.
    assert "domain-wide delegation is missing" in runner.status["nodwd"].last_error
    assert key["client_id"] in runner.status["nodwd"].last_error
    assert "does not exist in the Google Workspace domain" in runner.status["stranger"].last_error
    assert not ok


async def test_google_refresh_token_via_google_auth(oauth, oauth_dovecot, tmp_path, memory_store):
    user = oauth_dovecot.new_user("grt")
    oauth_dovecot.append(user.name, "INBOX", message(1))
    auth = generic(oauth, tmp_path, user)
    auth.update(provider="google")
    del auth["scope"]  # google's default: https://mail.google.com/
    ok, runner = await sync(settings(box(oauth_dovecot, oauth, user, "g", auth)), memory_store)
    assert ok, runner.status
    asked = [form for _, _, form in oauth.requests if form.get("client_id") == auth["client_id"]]
    assert [(f["grant_type"], f.get("scope")) for f in asked] == [("refresh_token", GOOGLE_MAIL_SCOPE)]


async def test_mailbox_not_granted_names_what_to_fix(oauth, oauth_dovecot, tmp_path, memory_store):
    user = oauth_dovecot.new_user("ng")
    before = oauth.grants("client_credentials")
    ok, runner = await sync(settings(box(oauth_dovecot, oauth, user, "ng", microsoft(oauth, tmp_path, user, granted=False))), memory_store)
    assert not ok
    error = runner.status["ng"].last_error
    assert error.startswith("CredentialsRefused: Exchange Online refused a fresh app-only token")
    assert "Add-MailboxPermission" in error and "IMAP.AccessAsApp" in error
    # The first token was refused, one fresh one was fetched and refused too: no more.
    assert oauth.grants("client_credentials") == before + 2


def test_check_reports_token_and_login_as_separate_lines(oauth, oauth_dovecot, tmp_path, capsys):
    user = oauth_dovecot.new_user("chk")
    good = microsoft(oauth, tmp_path, user)
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "mongodb": {"uri": "memory://"},
                "mailboxes": [
                    box(oauth_dovecot, oauth, user, "sales", good),
                    box(oauth_dovecot, oauth, user, "nogrant", microsoft(oauth, tmp_path, user, granted=False)),
                    box(oauth_dovecot, oauth, user, "tenant", {**good, "tenant_id": "not-our-tenant"}),
                    box(oauth_dovecot, oauth, user, "secret", {**good, "client_secret": "Xq9-not-the-secret", "client_secret_file": None}),
                ],
            }
        )
    )
    assert main(["check", "-c", str(config)]) == 1
    lines = capsys.readouterr().out.splitlines()

    def line(what):
        return next(x for x in lines if x.split()[1:3] == what.split())

    assert line("imap sales").startswith("ok") and "token obtained via microsoft (client credentials)" in line("imap sales")
    assert line("imap sales").split()[3] == "token" and line("imap sales").split()[0] == "ok"
    sales = [x for x in lines if x.split()[2] == "sales"]
    assert [(x.split()[0], x.split()[3]) for x in sales] == [("ok", "token"), ("ok", "login")]
    assert "login ok; folders: INBOX" in sales[1]
    nogrant = [x for x in lines if x.split()[2] == "nogrant"]
    assert [(x.split()[0], x.split()[3]) for x in nogrant] == [("ok", "token"), ("FAIL", "login")]
    assert "Add-MailboxPermission" in nogrant[1]
    tenant = [x for x in lines if x.split()[2] == "tenant"]
    assert [(x.split()[0], x.split()[3]) for x in tenant] == [("FAIL", "token")]  # no login line after a failed token
    assert "tenant_id 'not-our-tenant' was not found" in tenant[0]
    secret = [x for x in lines if x.split()[2] == "secret"]
    assert "the client secret is wrong" in secret[0] and "AADSTS7000215" in secret[0]
    assert "Xq9-not-the-secret" not in "\n".join(lines)


def test_auth_login_device_code_writes_the_token_file(oauth, oauth_dovecot, tmp_path, capsys):
    user = oauth_dovecot.new_user("dev")
    client = oauth.add_app(secret=None)
    token_file = tmp_path / "state" / "dev.token"
    token_file.parent.mkdir()
    auth = {
        "provider": "generic",
        "token_url": oauth.token_url,
        "device_authorization_url": oauth.device_url,
        "client_id": client.client_id,
        "refresh_token_file": str(token_file),
        "scope": "imap offline_access",
    }
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "mailboxes": [box(oauth_dovecot, oauth, user, "dev", auth)]}))
    # The person at the browser: enters the code once it has been shown.
    approver = threading.Thread(target=lambda: wait_until(lambda: oauth.devices) and oauth.approve_devices(user.name))
    approver.start()
    assert main(["auth", "login", "dev", "-c", str(config)]) == 0
    approver.join()
    out = capsys.readouterr().out
    assert "enter the code" in out and "Saved the refresh token for dev" in out
    saved = token_file.read_text().strip()
    assert oauth.refresh_tokens[saved] == (client.client_id, user.name)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert saved not in out
    assert main(["check", "-c", str(config)]) == 0
    assert "login ok" in capsys.readouterr().out


def test_auth_login_browser_flow_with_pkce(oauth, oauth_dovecot, tmp_path):
    user = oauth_dovecot.new_user("web")
    client = oauth.add_app(secret="web-secret")
    oauth.authorize_as = user.name
    cfg = settings(
        box(
            oauth_dovecot,
            oauth,
            user,
            "web",
            {
                "provider": "google",
                "client_id": client.client_id,
                "client_secret": "web-secret",
                "refresh_token_file": str(tmp_path / "web.token"),
                "token_url": oauth.token_url,
                "authorization_url": oauth.authorize_url,
            },
        )
    )
    shown = []

    class Out:
        def write(self, text):
            shown.append(text)

        def flush(self):
            pass

    # The browser: follows the provider's redirect back to the command's loopback listener.
    token = sign_in(cfg.mailboxes[0], Out(), browse=lambda url: requests.get(url, verify=oauth.ca_file, timeout=10))
    assert oauth.refresh_tokens[token] == (client.client_id, user.name)
    assert "code_challenge_method=S256" in "".join(shown) and "access_type=offline" in "".join(shown)


def test_auth_login_refuses_app_only_mailboxes(oauth, oauth_dovecot, tmp_path, capsys):
    user = oauth_dovecot.new_user("ao")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "mailboxes": [box(oauth_dovecot, oauth, user, "ao", microsoft(oauth, tmp_path, user))]}))
    assert main(["auth", "login", "ao", "-c", str(config)]) == 2
    assert "nothing to log in" in capsys.readouterr().err
    assert main(["auth", "login", "missing", "-c", str(config)]) == 2


def test_token_is_cached_and_refreshed_ahead_of_expiry(oauth, oauth_dovecot, tmp_path):
    user = oauth_dovecot.new_user("clk")
    now = [1_000_000.0]
    cfg = settings(box(oauth_dovecot, oauth, user, "clk", generic(oauth, tmp_path, user)))
    tokens = token_provider(cfg.mailboxes[0], clock=lambda: now[0])
    assert isinstance(tokens, RefreshTokenGrant)
    grants = oauth.grants("refresh_token")
    first = tokens.token()
    now[0] += oauth.token_lifetime - REFRESH_MARGIN - 1
    assert tokens.token() == first and oauth.grants("refresh_token") == grants + 1
    now[0] += 2  # inside the margin: a new token before the old one expires
    second = tokens.token()
    assert second != first and oauth.grants("refresh_token") == grants + 2
    assert tokens.token(force_refresh=True) not in (first, second)


def test_a_missing_refresh_token_file_says_to_sign_in(oauth, oauth_dovecot, tmp_path):
    user = oauth_dovecot.new_user("nofile")
    auth = {**generic(oauth, tmp_path, user), "refresh_token_file": str(tmp_path / "not-yet.token")}
    tokens = token_provider(settings(box(oauth_dovecot, oauth, user, "nofile", auth)).mailboxes[0])
    with pytest.raises(TokenRefused, match=r"no refresh token in .*not-yet.token: run `commsync auth login nofile`"):
        tokens.token()
