"""No configured secret reaches a log line, on any failure path, in JSON and console mode (issue 13, item 1).

One configuration holds a distinctive secret in every place a secret can be:
an IMAP password (refused), an OAuth2 client secret and refresh token (the token
endpoint is down), a Twilio auth token (401), a MongoDB password in the URI
(the server is down), and a mailbox whose message kills its parse worker. The
real code paths run (the runner, the CLI's `check`, the daemon's startup),
with tracebacks, at debug level; every line written is searched for every secret.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import imapclient
import pytest
import structlog

from commsync.config import settings_from_dict
from commsync.daemon import app, logs
from commsync.daemon.cli import main
from commsync.daemon.runner import Runner, StoreSink

from mailgen import message
from parser_poison import PoisonedPool

PASSWORD = "imap-pw-Zq81-" + "never-logged"
CLIENT_SECRET = "oauth-client-secret-" + "Yx62"
REFRESH_TOKEN = "oauth-refresh-token-" + "Wv43"
TWILIO_TOKEN = "f" * 24 + "twilio42"  # 32 characters, as Twilio's auth tokens
DB_PASSWORD = "db-pw-" + "Uu95-never-logged"
SECRETS = [PASSWORD, CLIENT_SECRET, REFRESH_TOKEN, TWILIO_TOKEN, DB_PASSWORD]


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    structlog.reset_defaults()
    logs.configure("info", json=True)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leaked(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


@pytest.fixture
def config(dovecot, tmp_path):
    """Every kind of secret, each on a path that fails."""
    from test_twilio_connector import ACC, TOKEN, FakeTwilio

    refused = dovecot.new_user("refused")
    poisoned = dovecot.new_user("poisoned")
    buggy = dovecot.new_user("buggy")
    dovecot.append(poisoned.name, "INBOX", message(1, subject="KILL-THE-PARSER now"))
    dovecot.append(poisoned.name, "INBOX", message(2))
    token_file = tmp_path / "refresh.token"
    token_file.write_text(REFRESH_TOKEN + "\n")
    fake = FakeTwilio().__enter__()
    fake.add_account(ACC, TOKEN)  # the configured token is another one: 401
    down = closed_port()
    data = {
        "mongodb": {"uri": "memory://"},
        "log_level": "debug",
        "daemon": {"parse_workers": 1},
        "mailboxes": [
            dovecot.mailbox(refused, name="refused", password=PASSWORD, folders=["INBOX"]),
            dovecot.mailbox(
                poisoned,
                name="oauth-down",
                password=None,
                folders=["INBOX"],
                auth={
                    "method": "oauth2",
                    "provider": "generic",
                    "token_url": f"https://127.0.0.1:{down}/token",
                    "client_id": "commsync",
                    "client_secret": CLIENT_SECRET,
                    "refresh_token_file": str(token_file),
                    "scope": "imap",
                },
            ),
            dovecot.mailbox(poisoned, name="poisoned", folders=["INBOX"]),
            # Its login fails with an error nobody expected, raised in a frame that holds the password:
            # the traceback is logged, and must not carry that frame's locals.
            dovecot.mailbox(buggy, name="buggy", password=PASSWORD, folders=["INBOX"]),
        ],
        "twilio_accounts": [{"name": "support", "account_sid": ACC, "auth_token": TWILIO_TOKEN, "base_url": fake.base_url}],
    }
    yield data, down, buggy.name
    fake.__exit__(None, None, None)


@pytest.mark.parametrize("json_mode", [True, False], ids=["json", "console"])
async def test_no_secret_in_any_log_line_on_any_failure_path(config, memory_store, capsys, monkeypatch, tmp_path, json_mode):
    data, down, buggy = config
    real_login = imapclient.IMAPClient.login

    def login(self, username, password):
        if username == buggy:
            raise RuntimeError("the IMAP library tripped over its own feet")
        return real_login(self, username, password)

    monkeypatch.setattr(imapclient.IMAPClient, "login", login)
    logs.configure("debug", json=json_mode)
    settings = settings_from_dict(data)
    pool = PoisonedPool(1, b"KILL-THE-PARSER")
    try:
        runner = Runner(app.build_connectors(settings, pool), StoreSink(memory_store), once=True, publish_status=True)
        assert await runner.run() is False
    finally:
        pool.shutdown()
    failures = {name: st.last_error or "" for name, st in runner.status.items()}
    assert "CredentialsRefused" in failures["refused"]
    assert failures["oauth-down"].startswith("TokenUnavailable: "), failures  # the token endpoint, not "cannot reach" the IMAP host
    assert "CredentialsRefused" in failures["support"] and "HTTP 401" in failures["support"]
    assert "RuntimeError" in failures["buggy"]
    assert await memory_store.quarantine_list(), "the poisoned message is in quarantine"

    first = capsys.readouterr()

    # MongoDB down, with its password in the URI: `check` and the daemon's start, logging as the CLI does.
    monkeypatch.setattr(type(sys.stderr), "isatty", lambda self: not json_mode, raising=False)
    db = {"uri": f"mongodb://commsync:{DB_PASSWORD}@127.0.0.1:{down}/crm?authSource=admin", "server_selection_timeout": "300ms"}
    checked = _write(tmp_path / "check.yaml", data | {"mongodb": db, "mailboxes": [], "twilio_accounts": []})
    assert await asyncio.to_thread(main, ["check", "-c", str(checked)]) == 1
    after_check = capsys.readouterr()
    assert "FAIL  mongodb" in after_check.out
    started = _write(tmp_path / "run.yaml", data | {"mongodb": db, "twilio_accounts": []})
    assert await asyncio.to_thread(main, ["run", "-c", str(started)]) == 1  # the service: MongoDB unreachable at start
    after_run = capsys.readouterr()
    assert "mongodb_unreachable" in after_run.err

    everything = "".join([first.err, first.out, after_check.err, after_check.out, after_run.err, after_run.out, json.dumps(failures)])
    assert "source_failed" in everything and "parse_pool_broken" in everything
    assert "tripped over its own feet" in everything and ("Traceback" in everything or '"frames"' in everything)  # a traceback was logged
    assert leaked(everything) == []
    assert leaked(json.dumps(await memory_store.quarantine_list(), default=str)) == []


def _write(path, data):
    path.write_text(json.dumps(data))
    return path
