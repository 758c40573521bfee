"""The `auth:` section of a mailbox: password keys keep working, OAuth2 keys are checked per provider."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from commsync.config import ConfigError, load_settings
from commsync.config.auth import GOOGLE_SCOPE, MICROSOFT_SCOPE
from commsync.connectors.oauth import explain, imap_refusal, refused
from commsync.daemon.cli import main

HEAD = """
mailboxes:
  - name: sales
    host: outlook.office365.com
    username: sales@ourco.example
"""


def load(tmp_path: Path, mailbox_tail: str):
    path = tmp_path / "commsync.yaml"
    path.write_text(textwrap.dedent(HEAD) + textwrap.indent(textwrap.dedent(mailbox_tail), "    "), encoding="utf-8")
    return load_settings(path)


def error(tmp_path: Path, mailbox_tail: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, mailbox_tail)
    return str(info.value)


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "ms-secret"
    path.write_text("client-secret-value\n")
    return path


def test_password_mailboxes_are_unchanged(tmp_path):
    s = load(tmp_path, "password: p\n")
    assert s.mailboxes[0].auth.method == "password"
    assert s.mailboxes[0].read_password() == "p"
    s = load(tmp_path, "password: p\nauth: {method: password}\n")
    assert s.mailboxes[0].auth.provider is None


def test_microsoft_example_from_the_issue_loads(tmp_path, secret_file):
    s = load(
        tmp_path,
        f"""
        auth:
          method: oauth2
          provider: microsoft
          tenant_id: 9188040d-6c67-4c5b-b112-36a304b66dad
          client_id: 3f0a7f5e-0000-4000-8000-000000000001
          client_secret_file: {secret_file}
        """,
    )
    auth = s.mailboxes[0].auth
    assert auth.effective_scope == MICROSOFT_SCOPE
    assert auth.read_client_secret() == "client-secret-value"
    assert "client-secret-value" not in repr(s)


def test_google_service_account_and_refresh_token_forms(tmp_path):
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({"type": "service_account", "client_email": "a@p.iam.gserviceaccount.com", "private_key": "-----BEGIN"}))
    s = load(tmp_path, f"auth: {{method: oauth2, provider: google, service_account_file: {key}}}\n")
    assert s.mailboxes[0].auth.effective_scope == GOOGLE_SCOPE
    # The refresh token file may not exist yet: `commsync auth login` writes it.
    s = load(tmp_path, f"auth: {{method: oauth2, provider: google, client_id: c, client_secret: s, refresh_token_file: {tmp_path / 'later'}}}\n")
    assert s.mailboxes[0].auth.refresh_token_file == tmp_path / "later"


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("auth: {method: oauth2}\n", "auth: provider is required with method: oauth2"),
        ("auth: {method: oauth2, provider: microsoft, client_id: c, client_secret: s}\n", "auth: tenant_id is required for provider microsoft"),
        ("auth: {method: oauth2, provider: microsoft, tenant_id: t, client_id: c}\n", "auth: client_secret_file (or client_secret, client_secret_env) is required for provider microsoft"),
        ("auth: {method: oauth2, provider: microsoft, tenant_id: t, client_id: c, client_secret: s, refresh_token_file: /x}\n", "auth: refresh_token_file: not used by provider microsoft"),
        ("auth: {method: oauth2, provider: microsoft, tenant_id: t, client_id: c, client_secret: s, client_secret_env: E}\n", "auth: set at most one of client_secret, client_secret_file, client_secret_env"),
        ("auth: {method: oauth2, provider: microsoft, tenant_id: t, client_id: c, client_secret: s, authority_host: 'http://login.example'}\n", "auth: authority_host must be an https:// URL"),
        ("auth: {method: oauth2, provider: microsoft, tenant_id: t, client_id: c, client_secret_file: /nonexistent/s}\n", "auth: cannot read /nonexistent/s"),
        ("auth: {method: oauth2, provider: google}\n", "auth: provider google needs exactly one of service_account_file or refresh_token_file"),
        ("auth: {method: oauth2, provider: google, refresh_token_file: /x}\n", "auth: client_id is required for provider google"),
        ("auth: {method: oauth2, provider: generic, client_id: c, refresh_token_file: /x, scope: s}\n", "auth: token_url is required for provider generic"),
        ("auth: {method: oauth2, provider: generic, token_url: 'https://t', client_id: c, refresh_token_file: /x}\n", "auth: scope is required for provider generic"),
        ("auth: {method: oauth2, provider: yahoo}\n", "auth.provider: Input should be 'microsoft', 'google' or 'generic'"),
        ("auth: {method: oauth2, provider: generic, tokn_url: x}\n", "auth.tokn_url: unknown key"),
        ("auth: {provider: microsoft}\npassword: p\n", "auth: provider: only used with method: oauth2"),
        ("password: p\nauth: {method: oauth2, provider: microsoft, tenant_id: t, client_id: c, client_secret: s}\n", "sales): password: not used with auth.method oauth2"),
    ],
)
def test_bad_oauth2_keys_name_file_key_and_reason(tmp_path, tail, expected):
    message = error(tmp_path, tail)
    assert message.startswith(f"{tmp_path / 'commsync.yaml'}: mailboxes[0](sales)")
    assert expected in message


def test_a_broken_service_account_file_is_named(tmp_path):
    key = tmp_path / "sa.json"
    key.write_text('{"type": "authorized_user"}')
    assert "is not a service account key" in error(tmp_path, f"auth: {{method: oauth2, provider: google, service_account_file: {key}}}\n")


def test_cli_exits_2_on_bad_oauth2_config(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(HEAD) + "    auth: {method: oauth2, provider: microsoft, client_id: c, client_secret: hunter2}\n")
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tenant_id is required for provider microsoft" in err and "hunter2" not in err


@pytest.mark.parametrize(
    ("body", "grant", "hint"),
    [
        ({"error": "invalid_client", "error_codes": [7000215], "error_description": "AADSTS7000215: Invalid client secret provided."}, "client_credentials", "client secret is wrong"),
        ({"error": "unauthorized_client", "error_codes": [700016], "error_description": "AADSTS700016: Application not found"}, "client_credentials", "check tenant_id and client_id"),
        ({"error": "invalid_request", "error_codes": [90002], "error_description": "AADSTS90002: Tenant not found"}, "client_credentials", "tenant_id is not a known tenant"),
        ({"error": "invalid_grant", "error_codes": [65001], "error_description": "AADSTS65001: consent"}, "client_credentials", "admin consent is missing"),
        ({"error": "invalid_grant", "error_codes": [700082], "error_description": "AADSTS700082: expired"}, "refresh_token", "run `commsync auth login sales`"),
        ({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}, "refresh_token", "run `commsync auth login sales`"),
        ({"error": "unauthorized_client", "error_description": "Client is unauthorized"}, "service_account", "domain-wide delegation is missing"),
        ({"error": "invalid_grant", "error_description": "Invalid email or User ID"}, "service_account", "does not exist in the Google Workspace domain"),
        ({"error": "access_denied"}, "refresh_token", "consent is missing"),
        ({"error": "temporarily_odd"}, "refresh_token", "the token endpoint refused: temporarily_odd"),
    ],
)
def test_oauth_errors_say_what_to_fix(body, grant, hint):
    message = str(refused("microsoft", body, grant=grant, name="sales"))
    assert hint in message
    assert f"said: {body['error']}" in message  # and what the provider said, first line only


def test_explain_and_imap_refusal_cover_each_provider():
    assert "Add-MailboxPermission" in imap_refusal("microsoft", "sales@ourco.example")
    assert "https://mail.google.com/" in imap_refusal("google", "sales@ourco.example")
    assert "sales@ourco.example" in imap_refusal("generic", "sales@ourco.example")
    assert "123" in explain("google", "unauthorized_client", grant="service_account", client_id="123")
