"""A source kind is one module plus one registration: a tiny in-memory kind, registered here and nowhere else."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel, ConfigDict, Field

from commsync.config import ConfigError, settings_from_dict
from commsync.connectors import registry
from commsync.connectors.base import Batch
from commsync.daemon import app, schema, status
from commsync.daemon.cli import main
from commsync.daemon.runner import Runner, StoreSink

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


class MemoConfig(BaseModel):
    """One memo pad: notes from customers, typed in by hand."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="The source name.")
    # A username, as IMAP has: the kind must still be told apart by its registration.
    username: str = Field(default="pad", description="Who keeps the pad.")
    notes: list[str] = Field(default_factory=list, description="`address: text` lines.")


class MemoConnector:
    kind = "memo"

    def __init__(self, config: MemoConfig):
        self.config = config
        self.name = config.name

    async def batches(self, state):
        done = state.get("notes", {}).get("done", 0)
        records = []
        for i, line in enumerate(self.config.notes[done:], start=done):
            address, _, text = line.partition(": ")
            records.append(
                {
                    "_id": f"memo:{self.name}:{i}",
                    "channel": "note",
                    "direction": "inbound",
                    "occurred_at": T0 + timedelta(hours=i),
                    "participants": [{"role": "from", "address": address, "name": None, "internal": False}],
                    "subject": None,
                    "content": text,
                    "sources": [{"kind": "memo", "source": self.name, "index": i}],
                }
            )
        yield Batch("notes", records, {"done": len(self.config.notes)})

    async def check(self):
        return f"{len(self.config.notes)} notes"

    async def aclose(self):
        return None


@pytest.fixture
def memo_kind():
    kind = registry.register(
        registry.SourceKind("memo", "memo_pads", MemoConfig, ("note",), lambda config, ctx: MemoConnector(config), "Memo pads (a test kind).")
    )
    yield kind
    registry.unregister("memo")


CONFIG = {
    "mongodb": {"uri": "memory://"},
    "memo_pads": [{"name": "front-desk", "notes": ["alice@example.com: called about the invoice", "bob@example.com: wants a quote"]}],
}


def test_the_config_accepts_the_kind_and_still_refuses_typos(memo_kind):
    settings = settings_from_dict(CONFIG)
    assert [s.name for s in settings.sources()] == ["front-desk"]
    assert settings.sources_of("memo")[0].notes[1] == "bob@example.com: wants a quote"
    with pytest.raises(ConfigError, match="memo_pads\\[0\\]\\(front-desk\\).note: unknown key"):
        settings_from_dict({"memo_pads": [{"name": "front-desk", "note": []}]})
    # Source names stay unique across every kind.
    with pytest.raises(ConfigError, match="used twice"):
        settings_from_dict({**CONFIG, "mailboxes": [{"name": "front-desk", "host": "h", "username": "u", "password": "p"}]})


def test_without_the_registration_the_key_is_unknown():
    with pytest.raises(ConfigError, match="memo_pads: unknown key"):
        settings_from_dict(CONFIG)


def test_rebuilding_the_config_model_adds_no_listener(memo_kind):
    # Each registration rebuilds the model, which asks to be told of the next change: once.
    from commsync.config.models import settings_model

    settings_model()
    before = len(registry._listeners)
    for _ in range(3):
        registry.unregister("memo")
        settings_model()
        registry.register(memo_kind)
        settings_model()
    assert len(registry._listeners) == before


async def test_the_kind_runs_through_runner_store_and_history(memo_kind, memory_store):
    await memory_store.customers.insert_one({"_id": "c-alice", "emails": ["alice@example.com"]})
    settings = settings_from_dict(CONFIG)
    connectors = app.build_connectors(settings, None)
    assert [type(c) for c in connectors] == [MemoConnector]
    assert await Runner(connectors, StoreSink(memory_store), once=True).run() is True
    assert await memory_store.records.count_documents({"channel": "note"}) == 2
    history = await memory_store.history.find_one({"_id": "c-alice"})
    assert history["channels"]["note"]["count"] == 1 and history["last_channel"] == "note"
    assert await memory_store.load_state("front-desk") == {"notes": {"done": 2}}


def test_status_schema_and_cli_read_the_registry(memo_kind, tmp_path, capsys):
    settings = settings_from_dict(CONFIG)
    rows = status.status_rows(settings.sources(), [], [], datetime.now(UTC))
    assert rows[0]["kind"] == "memo"  # not "imap" for having a username
    assert "note" in schema.record_schema()["properties"]["channel"]["enum"]
    assert "note" in schema.history_schema()["properties"]["last_channel"]["enum"]
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(CONFIG))
    assert main(["check", "-c", str(path)]) == 0
    assert "ok    memo front-desk" in capsys.readouterr().out
    assert main(["records", "list", "--channel", "note", "-c", str(path)]) == 0  # --channel knows the kind's channel


def test_a_kind_cannot_take_another_kinds_settings_key(memo_kind):
    with pytest.raises(ValueError, match="belongs to kind 'memo'"):
        registry.register(registry.SourceKind("other", "memo_pads", MemoConfig, ("note",), lambda c, ctx: None))


# -- the fingerprint: what makes a parked source try again ---------------------------------------


def mailbox(**entry):
    from commsync.config.models import MailboxConfig

    return MailboxConfig.model_validate({"name": "sales", "host": "imap.example", "username": "sales@ourco.example", **entry})


def twilio(**entry):
    from commsync.config.models import TwilioAccountConfig

    return TwilioAccountConfig.model_validate({"name": "support", "account_sid": "AC" + "1" * 32, **entry})


def test_the_fingerprint_follows_each_secret_value(monkeypatch):
    old = registry.fingerprint(mailbox(password="old password"))
    assert registry.fingerprint(mailbox(password="old password")) == old
    assert registry.fingerprint(mailbox(password="new password")) != old
    assert registry.fingerprint(twilio(auth_token="a" * 32)) != registry.fingerprint(twilio(auth_token="b" * 32))
    # A new value of the variable (the daemon restarted with it) counts as much as an edited entry.
    monkeypatch.setenv("SALES_PW", "old password")
    from_env = mailbox(password_env="SALES_PW")
    before = registry.fingerprint(from_env)
    monkeypatch.setenv("SALES_PW", "new password")
    assert registry.fingerprint(from_env) != before
    monkeypatch.delenv("SALES_PW")
    assert registry.fingerprint(from_env) != before


def test_a_secret_enters_the_fingerprint_only_salted_and_stretched():
    import hashlib

    derived = registry._secret_digest("sales", "password", "hunter2")
    assert derived != hashlib.sha256(b"hunter2").digest()
    # The same password in another source, or under another key, gives an unrelated digest.
    assert derived != registry._secret_digest("support", "password", "hunter2")
    assert derived != registry._secret_digest("sales", "auth.client_secret", "hunter2")
    fp = registry.fingerprint(mailbox(password="hunter2"))
    assert "hunter2" not in fp and hashlib.sha256(b"hunter2").hexdigest()[:32] != fp


def test_a_new_sign_in_changes_the_fingerprint_where_the_daemon_reads_the_token(monkeypatch, tmp_path):
    from commsync.config.secrets import write_secret_file
    from commsync.connectors import oauth

    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    config = mailbox(auth={"method": "oauth2", "provider": "google", "client_id": "c", "client_secret": "s", "refresh_token_file": "sales.token"})
    write_secret_file(state / "sales.token", "the old token")
    assert oauth.read_refresh_token(config.auth, "sales") == "the old token"  # where the daemon reads it
    before = registry.fingerprint(config)
    # `commsync auth login sales` writes it there anew.
    write_secret_file(state / "sales.token", "the token of a new sign-in")
    assert registry.fingerprint(config) != before
