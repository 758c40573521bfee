"""daemon/logs.py: journal priorities on stderr, and tracebacks without frame locals."""

from __future__ import annotations

import json
import os
import sys

import pytest
import structlog

from commsync.daemon import logs

SECRET = "s3cr3t-" + "hunter2-in-a-local"


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    logs.configure("info", json=True)


def _fail_with_a_secret_local() -> None:
    mailbox_login = SECRET  # a frame local holding a secret, under a name no redaction rule knows
    raise ConnectionError(f"login refused for {len(mailbox_login)}-char credential")


def _log_exception() -> None:
    try:
        _fail_with_a_secret_local()
    except ConnectionError:
        structlog.get_logger("t").exception("source_failed", source="sales")


@pytest.mark.parametrize("json_mode", [True, False], ids=["json", "console"])
def test_exceptions_are_logged_without_frame_locals(capsys, json_mode):
    logs.configure("info", json=json_mode)
    _log_exception()
    err = capsys.readouterr().err
    # The traceback is there (the frame that raised is named) ...
    assert "_fail_with_a_secret_local" in err and "ConnectionError" in err
    # ... but not what its locals held.
    assert SECRET not in err
    if json_mode:
        event = json.loads(err)
        frames = event["exception"][0]["frames"]
        assert frames and all("locals" not in f or not f["locals"] for f in frames)


def _stderr_file(tmp_path, monkeypatch, *, journal: bool):
    f = open(tmp_path / "stderr", "w+")  # noqa: SIM115 - closed below
    st = os.fstat(f.fileno())
    monkeypatch.setattr(sys, "stderr", f)
    if journal:
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    else:
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # someone else's stream
    return f


def _emit_levels() -> None:
    log = structlog.get_logger("t")
    log.debug("d")
    log.info("batch_stored", records=3)
    log.warning("imap_connection_lost")
    log.error("source_failed")
    try:
        raise ValueError("x")
    except ValueError:
        log.exception("reload_failed")


def test_lines_carry_their_journal_priority_when_stderr_is_the_journal(tmp_path, monkeypatch):
    f = _stderr_file(tmp_path, monkeypatch, journal=True)
    logs.configure("debug")
    _emit_levels()
    f.seek(0)
    lines = f.read().splitlines()
    f.close()
    got = [(line[:3], json.loads(line[3:])["event"]) for line in lines]
    assert got == [
        ("<7>", "d"),
        ("<6>", "batch_stored"),
        ("<4>", "imap_connection_lost"),
        ("<3>", "source_failed"),
        ("<3>", "reload_failed"),
    ]


def test_no_prefix_when_stderr_is_not_the_journal(tmp_path, monkeypatch):
    # JOURNAL_STREAM inherited by a process whose stderr was redirected elsewhere.
    f = _stderr_file(tmp_path, monkeypatch, journal=False)
    logs.configure("info")
    _emit_levels()
    f.seek(0)
    lines = f.read().splitlines()
    f.close()
    assert len(lines) == 4 and all(json.loads(line)["event"] for line in lines)
