"""Reload semantics in process: what a new config file changes without a restart."""

from __future__ import annotations

import json

from structlog.testing import capture_logs

from commsync.config import load_settings
from commsync.daemon.runner import Runner, StoreSink
from commsync.daemon.supervisor import Supervisor

from records import email_record


async def test_reload_applies_the_capture_policy_to_the_next_batch(tmp_path, memory_store):
    path = tmp_path / "commsync.yaml"
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}}))
    runner = Runner([], StoreSink(memory_store))
    supervisor = Supervisor(path, load_settings(path), runner, None)
    supervisor.start()

    assert (await memory_store.write_batch([email_record("a@x", "news@spam.example")])).records == 1
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "blocklist": ["@spam.example"]}))
    assert await supervisor.reload() is True
    result = await memory_store.write_batch([email_record("b@x", "news@spam.example")])
    assert result.records == 0 and sum(result.not_captured.values()) == 1

    path.write_text("blocklist: [unterminated")
    assert await supervisor.reload() is False  # the running configuration stays
    assert (await memory_store.write_batch([email_record("c@x", "news@spam.example")])).records == 0


async def test_reload_keeps_restart_only_keys_at_their_running_values(tmp_path, memory_store):
    path = tmp_path / "commsync.yaml"
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}}))
    supervisor = Supervisor(path, load_settings(path), Runner([], StoreSink(memory_store)), None)
    old_record = email_record("old@x")
    old_record["occurred_at"] = old_record["occurred_at"].replace(year=2001)
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "retention": {"days": 30}, "daemon": {"lease_ttl": "2m"}}))
    with capture_logs() as logs:
        assert await supervisor.reload() is True
    (warning,) = [e for e in logs if e["event"] == "reload_needs_restart"]
    assert warning["keys"] == ["retention", "daemon.lease_ttl"]
    # retention needs a restart (the purge job keeps its schedule): capture does not start refusing old records.
    assert (await memory_store.write_batch([old_record])).records == 1


def test_a_start_with_no_sources_is_refused_as_a_bad_config(tmp_path, capsys):
    from commsync.daemon.cli import main

    path = tmp_path / "commsync.yaml"
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}}))
    assert main(["run", "-c", str(path)]) == 2  # the unit's RestartPreventExitStatus=2: not restarted
    assert "the config lists no sources" in capsys.readouterr().err


async def test_a_reload_that_removes_every_source_leaves_the_daemon_idling(tmp_path, memory_store):
    path = tmp_path / "commsync.yaml"
    box = {"name": "m", "host": "127.0.0.1", "port": 9, "security": "none", "username": "u", "password": "p"}
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "mailboxes": [box]}))
    runner = Runner([], StoreSink(memory_store))
    supervisor = Supervisor(path, load_settings(path), runner, None)
    supervisor.start()
    assert set(runner.status) == {"m"}
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}}))
    with capture_logs() as logs:
        assert await supervisor.reload() is True
    assert [e["event"] for e in logs if e["event"] in ("no_sources", "reloaded")] == ["no_sources", "reloaded"]
    assert set(runner.status) == set() and not runner.stopping


async def test_a_restart_only_key_restarts_no_source_and_keeps_its_running_value(tmp_path, memory_store):
    # default_region is read by the store's matching at start: rebuilding the Twilio connectors
    # with the new one would number phones one way and match them another.
    path = tmp_path / "commsync.yaml"
    account = {"name": "tw", "account_sid": "AC" + "1" * 32, "auth_token": "t" * 32}
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "default_region": "US", "twilio_accounts": [account]}))
    runner = Runner([], StoreSink(memory_store))
    supervisor = Supervisor(path, load_settings(path), runner, None)
    supervisor.start()
    running = runner.connector("tw")
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "default_region": "DE", "twilio_accounts": [account]}))
    with capture_logs() as logs:
        assert await supervisor.reload() is True
    (done,) = [e for e in logs if e["event"] == "reloaded"]
    assert done["restarted"] == [] and runner.connector("tw") is running
    assert [e["keys"] for e in logs if e["event"] == "reload_needs_restart"] == [["default_region"]]
    assert supervisor.settings.default_region == "US"
