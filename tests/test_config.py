"""Config: a good file loads with sensible defaults; a bad one names file, key and reason."""

from __future__ import annotations

import textwrap
from datetime import date, timedelta
from pathlib import Path

import pytest

from commsync.config import ConfigError, load_settings
from commsync.daemon.cli import main

GOOD = """
mongodb:
  uri: mongodb://localhost:27017
  database: crm
customers:
  collection: customers
internal_domains: [OurCo.example]
mailboxes:
  - name: sales
    host: imap.ourco.example
    port: 993
    security: tls
    username: sales@ourco.example
    password_file: {secret}
    folders: [INBOX, Sent]
    since: 2024-01-01
"""


def write(tmp_path: Path, text: str, name: str = "commsync.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "sales.pw"
    path.write_text("s3cr3t-pa55\n", encoding="utf-8")
    return path


def test_issue_example_loads(tmp_path, secret):
    s = load_settings(write(tmp_path, GOOD.format(secret=secret)))
    box = s.mailboxes[0]
    assert s.mongodb.database == "crm"
    assert s.internal_domains == ["ourco.example"]
    assert box.since == date(2024, 1, 1)
    assert box.read_password() == "s3cr3t-pa55"  # trailing newline of the file is not part of it
    assert box.own_addresses == frozenset({"sales@ourco.example"})


def test_defaults_a_user_would_choose(tmp_path):
    s = load_settings(write(tmp_path, "mailboxes: [{name: a, host: h, username: u@x.example, password: p}]"))
    box = s.mailboxes[0]
    assert (box.security, box.effective_port, box.tls_verify) == ("tls", 993, True)
    assert box.folders is None  # INBOX plus the \Sent folder, found at connect time
    assert 100 <= box.batch_size <= 1000
    assert s.daemon.poll_interval == timedelta(minutes=1)


def test_durations_read_like_a_human_writes_them(tmp_path):
    s = load_settings(write(tmp_path, "daemon: {poll_interval: 30s, backoff_max: 15m}"))
    assert s.daemon.poll_interval == timedelta(seconds=30)
    assert s.daemon.backoff_max == timedelta(minutes=15)


def test_environment_overrides_the_file(tmp_path, secret, monkeypatch):
    monkeypatch.setenv("COMMSYNC_MONGODB__URI", "mongodb://db.internal:27017")
    monkeypatch.setenv("COMMSYNC_LOG_LEVEL", "debug")
    s = load_settings(write(tmp_path, GOOD.format(secret=secret)))
    assert s.mongodb.uri == "mongodb://db.internal:27017"
    assert s.mongodb.database == "crm"  # the rest of the section still comes from the file
    assert s.log_level == "debug"


def test_password_from_env_and_credentials_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SALES_PW", "from-env")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "support").write_text("from-creds", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_settings(
        write(
            tmp_path,
            """
            mailboxes:
              - {name: a, host: h, username: u, password_env: SALES_PW}
              - {name: b, host: h, username: u, password_file: support}
            """,
        )
    )
    assert [m.read_password() for m in s.mailboxes] == ["from-env", "from-creds"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("mailboxes: [{name: a, host: h, username: u, password: p, prot: 1}]", "mailboxes[0](a).prot: unknown key"),
        ("mailboxes: [{name: a, host: h, username: u}]", "mailboxes[0](a): set exactly one of password"),
        ("mailboxes: [{name: a, host: h, username: u, password: p, security: ssl}]", "mailboxes[0](a).security: Input should be"),
        ("mailboxes: [{name: a, host: h, username: u, password: p, port: 99999}]", "mailboxes[0](a).port:"),
        ("mailboxes: [{name: a, host: h, username: u, password_file: /nonexistent/pw}]", "mailboxes[0](a): password_file: cannot read /nonexistent/pw"),
        ("mailboxes: [{name: a, host: h, username: u, password_env: NOPE_NOT_SET_XYZ}]", "password_env: environment variable NOPE_NOT_SET_XYZ is not set"),
        ("mailboxes: [{name: a, host: h, username: u, password: ''}]", "mailboxes[0](a): password: the value is empty"),
        ("daemon: {poll_interval: five minutes}", "daemon.poll_interval: 'five minutes' is not a duration: write it as 90s, 15m, 2h"),
        ("daemon: {lease_ttl: 10 parsecs}", "daemon.lease_ttl: '10 parsecs' is not a duration"),
        (
            "mailboxes: [{name: a, host: h, username: u, password: p}, {name: a, host: h, username: u, password: p}]",
            "source name 'a' is used twice",
        ),
        ("mongodb: {uri: mongodb://x, databse: crm}", "mongodb.databse: unknown key"),
        ("mailboxes:\n  - name: a\n   host: h", "not valid YAML"),
        ("- just\n- a list", "top level must be a mapping"),
        ("mailboxes: [{name: 'bad name/x', host: h, username: u, password: p}]", "mailboxes[0](bad name/x).name:"),
    ],
)
def test_bad_config_names_file_key_and_reason(tmp_path, body, expected):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml")


def test_cli_exits_2_on_bad_config_and_never_prints_the_password(tmp_path, capsys):
    path = write(tmp_path, "mailboxes: [{name: a, host: h, username: u, password: TopSecret123, port: nope}]")
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "mailboxes[0](a).port" in err and str(path) in err
    assert "TopSecret123" not in err


def test_secrets_stay_out_of_repr(tmp_path):
    s = load_settings(
        write(tmp_path, "mongodb: {uri: 'mongodb://app:DbPass99@db:27017'}\nmailboxes: [{name: a, host: h, username: u, password: TopSecret123}]")
    )
    text = repr(s) + str(s)
    assert "TopSecret123" not in text and "DbPass99" not in text


def test_example_config_is_valid(monkeypatch):
    example = Path(__file__).resolve().parents[1] / "config" / "example.yaml"
    monkeypatch.setenv("COMMSYNC_EXAMPLE_PASSWORD", "x")
    s = load_settings(example)
    assert s.mailboxes


def test_relative_secret_files_fall_back_to_the_install_credentials_dir(tmp_path, monkeypatch):
    """`commsync check` run by hand finds the files the unit's LoadCredential= lines name."""
    from commsync.config import secrets

    creds = tmp_path / "etc-credentials"
    creds.mkdir()
    (creds / "sales").write_text("from-install-dir\n", encoding="utf-8")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setattr(secrets, "CREDENTIALS_FALLBACK", creds)
    monkeypatch.chdir(tmp_path)
    s = load_settings(write(tmp_path, "mailboxes: [{name: a, host: h, username: u, password_file: sales}]"))
    assert s.mailboxes[0].read_password() == "from-install-dir"
    # A file of that name in the working directory wins, as a relative path reads.
    (tmp_path / "sales").write_text("from-cwd", encoding="utf-8")
    assert s.mailboxes[0].read_password() == "from-cwd"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("mailboxes: [{name: a, host: imap.example.com, security: none, username: u, password: p}]", "in clear"),
        ("twilio_accounts: [{name: t, account_sid: AC0123456789abcdef0123456789abcdef, auth_token: x, base_url: 'http://proxy.example.com'}]", "must use https"),
    ],
)
def test_cleartext_credentials_to_another_host_are_refused(tmp_path, body, expected):
    with pytest.raises(ConfigError, match=expected):
        load_settings(write(tmp_path, body))


def test_cleartext_is_allowed_on_loopback_or_when_asked_for(tmp_path):
    s = load_settings(
        write(
            tmp_path,
            """
            mailboxes:
              - {name: a, host: 127.0.0.1, security: none, username: u, password: p}
              - {name: b, host: imap.lan, security: none, allow_plaintext: true, username: u, password: p}
            twilio_accounts: [{name: t, account_sid: AC0123456789abcdef0123456789abcdef, auth_token: x, base_url: 'http://localhost:8080'}]
            """,
        )
    )
    assert [m.name for m in s.mailboxes] == ["a", "b"]


def test_an_empty_password_file_is_refused_at_load_and_at_login(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("\n")  # `echo > pw`: a newline and nothing else
    with pytest.raises(ConfigError, match=r"password_file: .*pw is empty"):
        load_settings(write(tmp_path, f"mailboxes: [{{name: a, host: h, username: u, password_file: {secret}}}]"))
    secret.write_text("s3cret\n")
    s = load_settings(write(tmp_path, f"mailboxes: [{{name: a, host: h, username: u, password_file: {secret}}}]"))
    assert s.mailboxes[0].read_password() == "s3cret"
    secret.write_text("")  # emptied while the daemon runs: the next login must not send an empty password
    with pytest.raises(ValueError, match="is empty"):
        s.mailboxes[0].read_password()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("1.5h", 5400), ("01:30:00", 5400), ("2 h", 7200), ("PT15M", 900)],
)
def test_durations_in_the_forms_people_write(text, seconds):
    from commsync.config import settings_from_dict

    assert settings_from_dict({"daemon": {"poll_interval": text}}).daemon.poll_interval.total_seconds() == seconds
