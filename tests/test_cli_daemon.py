"""The daemon as a real process: it captures, and SIGTERM ends it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from mailgen import message


def test_sigterm_stops_the_daemon_with_exit_0(dovecot, imap_user, tmp_path):
    for i in range(3):
        dovecot.append(imap_user.name, "INBOX", message(i))
    config = tmp_path / "commsync.yaml"
    config.write_text(
        json.dumps(
            {
                "mongodb": {"uri": "memory://"},
                "daemon": {"poll_interval": "1s", "parse_workers": 1},
                "mailboxes": [dovecot.mailbox(imap_user, password=None, password_env="TEST_IMAP_PASSWORD", folders=["INBOX"])],
            }
        )
    )
    env = {**os.environ, "TEST_IMAP_PASSWORD": imap_user.password}
    proc = subprocess.Popen(
        [sys.executable, "-m", "commsync.daemon.cli", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        events = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            events.append(json.loads(line))
            if events[-1]["event"] == "batch_stored" and events[-1]["records"] == 3:
                break
        assert any(e["event"] == "batch_stored" and e["records"] == 3 for e in events), events
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    tail = [json.loads(x) for x in err.splitlines() if x.strip()]
    assert [e["event"] for e in tail][-1] == "stopped"
    assert out == ""  # stdout is for command output only
    assert imap_user.password not in err and imap_user.password not in "".join(json.dumps(e) for e in events)


def test_run_once_takes_no_leases_and_runs_no_maintenance(dovecot, imap_user, cli):
    # README: `run --once` may work a source beside a daemon; the daily purge is the daemon's.
    from datetime import UTC, datetime

    from records import email_record

    dovecot.append(imap_user.name, "INBOX", message(1, date=datetime.now(UTC)))
    cli.write(mailboxes=[dovecot.mailbox(imap_user, folders=["INBOX"])], retention={"days": 30})
    old = email_record("old@x")
    old["occurred_at"] = old["occurred_at"].replace(year=2001)
    cli.db(lambda db: db.write_batch([old]))
    assert cli("run", "--once")[0] == 0
    ids = cli.db(lambda db: db.records.distinct("_id"))
    assert len(ids) == 2 and "old@x" in ids, ids  # captured; the old one not purged
    assert cli.db(lambda db: db.db["leases"].count_documents({})) == 0
    assert cli.db(lambda db: db.db["instances"].count_documents({})) == 0


def test_the_config_defaults_to_commsync_config(tmp_path, monkeypatch, capsys):
    from commsync.daemon.cli import main

    config = tmp_path / "elsewhere.yaml"
    config.write_text(json.dumps({"mongodb": {"uri": "memory://"}}))
    monkeypatch.setenv("COMMSYNC_CONFIG", str(config))
    assert main(["check"]) == 0
    assert f"config                   {config}" in capsys.readouterr().out
    monkeypatch.setenv("COMMSYNC_CONFIG", str(tmp_path / "missing.yaml"))
    assert main(["check"]) == 2
    assert "missing.yaml" in capsys.readouterr().err
