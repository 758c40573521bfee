"""`commsync status`: the table of every source, from what the runners keep in MongoDB."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from commsync.config import settings_from_dict
from commsync.connectors.base import Batch
from commsync.daemon import app, logs, status
from commsync.daemon.cli import main
from commsync.daemon.leases import LeaseKeeper
from commsync.daemon.retry import RetryPolicy
from commsync.daemon.runner import Runner, StoreSink

from eventually import eventually
from records import T0, email_record, hours

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def config(*names):
    return settings_from_dict(
        {
            "mongodb": {"uri": "memory://"},
            "mailboxes": [{"name": n, "host": "imap.example", "username": n, "password": "x"} for n in names],
        }
    )


class Source:
    kind = "imap"

    def __init__(self, name, fail=False):
        self.name, self.fail = name, fail

    async def batches(self, state):
        if self.fail:
            raise ConnectionRefusedError(111, "Connection refused")
        if not state:
            yield Batch("INBOX", [email_record(f"{self.name}-{i}@x", at=T0 + hours(i), source=self.name, uid=i) for i in range(3)], {"last_uid": 3})

    async def check(self):
        return "ok"

    async def aclose(self):
        return None


def test_rows_join_config_status_and_leases():
    statuses = [
        {"_id": "sales", "kind": "imap", "state": "waiting", "last_success": NOW - timedelta(seconds=40), "consecutive_failures": 0, "backlog": 0},
        {
            "_id": "support",
            "kind": "imap",
            "state": "backoff",
            "last_success": NOW - timedelta(hours=3),
            "consecutive_failures": 4,
            "backlog": 120,
            "last_error": "ConnectionRefusedError: [Errno 111] Connection refused",
            "last_error_at": NOW - timedelta(minutes=2),
        },
        {"_id": "old", "kind": "imap", "state": "waiting", "last_success": NOW - timedelta(days=9)},
    ]
    leases = [
        {"_id": "sales", "owner": "host-a/41", "expires_at": NOW + timedelta(seconds=30)},
        {"_id": "support", "owner": "host-b/7", "expires_at": NOW + timedelta(seconds=30)},
        {"_id": "old", "owner": "host-c/1", "expires_at": NOW - timedelta(hours=1)},  # expired: nobody's
    ]
    rows = status.status_rows(config("sales", "support", "new").sources(), statuses, leases, NOW)
    assert [(r["source"], r["owner"], r["state"], r["in_config"]) for r in rows] == [
        ("sales", "host-a/41", "waiting", True),
        ("support", "host-b/7", "backoff", True),
        ("new", None, "never run", True),
        ("old", None, "no owner", False),
    ]
    text = status.render(rows, [{"owner": "host-a/41", "alive": True, "seen_at": NOW - timedelta(seconds=5)}], NOW)
    lines = text.splitlines()
    assert lines[0].split() == ["SOURCE", "KIND", "OWNER", "STATE", "LAST", "SUCCESS", "NEWEST", "VERIFIED", "FAILS", "BACKLOG", "LAST", "ERROR"]
    assert lines[1].split()[:7] == ["sales", "imap", "host-a/41", "waiting", "2025-03-01", "11:59:20Z", "(40s"]
    assert "support" in lines[2] and " 4 " in lines[2] and "120" in lines[2] and "2m ago: ConnectionRefusedError" in lines[2]
    assert lines[3].split()[:5] == ["new", "imap", "-", "never", "run"]
    assert lines[4].startswith("old (not in config)") and "(9d ago)" in lines[4]
    assert text.endswith("instances alive: 1\n  host-a/41 (seen 5s ago)")


async def test_status_command_reads_what_the_runner_keeps(memory_store, monkeypatch, capsys):
    logs.configure("info")  # events to stderr, as the CLI has them: stdout is the table's
    keeper = LeaseKeeper(memory_store, owner="host-a/41", ttl=timedelta(seconds=30))
    runner = Runner(
        [Source("sales"), Source("support", fail=True)],
        StoreSink(memory_store),
        poll_interval=timedelta(seconds=30),
        policy=RetryPolicy(backoff_max=timedelta(seconds=30)),
        leases=keeper,
    )
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: runner.status["sales"].passes and runner.status["support"].failures)
        monkeypatch.setattr(app, "open_store", lambda settings: memory_store)  # the running daemon's database
        assert await status.show_status(config("sales", "support"), SimpleNamespace(json=False)) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[1].split()[:4] == ["sales", "imap", "host-a/41", "waiting"] and table[1].split()[-3:] == ["0", "?", "-"]
        assert table[2].split()[:4] == ["support", "imap", "host-a/41", "backoff"]
        assert "never" in table[2] and "ConnectionRefusedError" in table[2]
        assert "instances alive: 1" in table[-2] and "host-a/41" in table[-1]

        assert await status.show_status(config("sales", "support"), SimpleNamespace(json=True)) == 0
        data = json.loads(capsys.readouterr().out)
        by_name = {r["source"]: r for r in data["sources"]}
        assert by_name["support"]["consecutive_failures"] >= 1 and by_name["sales"]["backlog"] is None
        assert by_name["sales"]["last_success"].startswith(str(datetime.now(UTC).year))
    finally:
        runner.stop()
        await asyncio.wait_for(task, 10)


def test_notes_say_what_needs_a_human():
    statuses = [
        {"_id": "sales", "kind": "imap", "state": "parked", "parked_reason": "credentials refused since 2025-02-26 09:00Z"},
        {
            "_id": "support",
            "kind": "imap",
            "state": "waiting",
            "problems": {"folder:Gone": "folder 'Gone' does not exist on the server; the others are captured"},
            "newest_item_at": NOW - timedelta(minutes=3),
            "verified_at": NOW - timedelta(hours=2),
            "verified": {"INBOX": {"missing": 2, "quarantined": 1}, "Sent%2EOld": {"missing": 0, "quarantined": 0}},
        },
        {"_id": "billing", "kind": "twilio", "state": "waiting", "updated_at": NOW - timedelta(minutes=9)},
    ]
    leases = [{"_id": "support", "owner": "host-a/41", "expires_at": NOW + timedelta(seconds=30)}]
    rows = status.status_rows(config("sales", "support", "billing").sources(), statuses, leases, NOW, lease_ttl=timedelta(seconds=60))
    assert [r["state"] for r in rows] == ["parked", "waiting", "no owner"]
    assert rows[1]["verified"]["Sent.Old"] == {"missing": 0, "quarantined": 0}
    text = status.render(rows, [], NOW)
    assert "! parked: credentials refused since 2025-02-26 09:00Z; fix the credentials and reload, or `commsync source resume sales`" in text
    assert "! folder 'Gone' does not exist on the server" in text
    assert "! verify INBOX: 2 missing, 1 quarantined" in text and "3 open 2h ago" in text and " 3m " in text
    assert "! no instance has worked it for 9m" in text


def test_status_cli_on_a_fresh_database(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "mailboxes": [{"name": "sales", "host": "h", "username": "u", "password": "p"}]}))
    assert main(["status", "-c", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["sales", "imap", "-", "never", "run", "never", "-", "-", "0", "?", "-"]
    assert out[-1] == "instances alive: 0"


def test_status_cli_when_mongodb_is_unreachable(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        json.dumps(
            {
                "mongodb": {"uri": "mongodb://127.0.0.1:9", "server_selection_timeout": "300ms"},
                "mailboxes": [{"name": "sales", "host": "h", "username": "u", "password": "p"}],
            }
        )
    )
    assert main(["status", "-c", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "cannot read the status from MongoDB" in captured.err
