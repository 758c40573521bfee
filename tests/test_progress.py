"""Progress of long passes: `progress` events off a terminal, rich bars on one, neither with --quiet."""

from __future__ import annotations

import functools
import io
import json
import mailbox
import sys
from types import SimpleNamespace

import pytest
import structlog
import test_service as service_process  # its Daemon: `commsync run` in a subprocess
from rich.console import Console
from structlog.testing import capture_logs

from commsync.config import settings_from_dict
from commsync.connectors.base import Batch
from commsync.connectors.mailpool import MailOptions, MailParser
from commsync.connectors.mbox import MboxConnector
from commsync.daemon import app, cli, logs, progress
from commsync.daemon.progress import Progress
from commsync.daemon.runner import Runner, StoreSink

from mailgen import message

# -- helpers ------------------------------------------------------------------------------


def write_mbox(path, n):
    box = mailbox.mbox(path)
    for i in range(n):
        box.add(message(i))
    box.flush()
    box.close()


def mbox_config(tmp_path, n=25):
    path = tmp_path / "a.mbox"
    write_mbox(path, n)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "daemon": {"parse_workers": 1}}))
    return path, config


@pytest.fixture
def small_batches(monkeypatch):
    """`commsync import mbox` in batches of 10, and a `progress` event after every one of them."""
    monkeypatch.setattr(cli, "MboxConnector", functools.partial(MboxConnector, batch_size=10))
    monkeypatch.setattr(progress, "EVERY_S", 0.0)


@pytest.fixture
def restore_logging():
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def events(stderr, name="progress"):
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event["event"] == name:
                found.append(event)
    return found


def terminal():
    out = io.StringIO()
    return out, Console(file=out, force_terminal=True, width=120, color_system=None)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def fake_runner(**backlogs):
    """What Progress reads from a Runner: each source's status, with its backlog."""
    return SimpleNamespace(status={name: SimpleNamespace(name=name, backlog=b) for name, b in backlogs.items()})


def batch(n, stream="INBOX", skipped=0):
    return Batch(stream, [{"_id": i} for i in range(n)], {}, skipped=skipped)


def parser():
    return MailParser(MailOptions(frozenset({"sales@ourco.example"}), frozenset({"ourco.example"}), 100_000))


# -- JSON mode through the real command line ------------------------------------------------


def test_import_mbox_logs_progress_events(tmp_path, capsys, small_batches):
    path, config = mbox_config(tmp_path, 25)
    assert cli.main(["import", "mbox", str(path), "-c", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "imported 25 records" in out
    found = events(err)
    # One after each batch of 10 (the interval is 0 here), then the pass's last word.
    assert [(e["done"], e["total"], e.get("final", False)) for e in found] == [(10, 25, False), (20, 25, False), (25, 25, False), (25, 25, True)]
    assert all(e["source"] == "mbox-a.mbox" and e["stream"] == "messages" for e in found)
    # The rate is measured from the first batch: unknown after it, positive after the next.
    assert found[0]["rate_per_s"] is None and found[0]["eta_s"] is None
    assert found[1]["rate_per_s"] > 0 and found[1]["eta_s"] >= 0
    assert found[-1]["rate_per_s"] > 0 and found[-1]["eta_s"] == 0
    # The JSON events are all still there.
    assert len(events(err, "batch_stored")) == 3


def test_import_mbox_quiet_logs_no_progress(tmp_path, capsys, small_batches):
    path, config = mbox_config(tmp_path, 25)
    assert cli.main(["import", "mbox", str(path), "-c", str(config), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert events(err) == []
    assert len(events(err, "batch_stored")) == 3


def test_import_mbox_draws_a_bar_on_a_terminal_and_none_when_quiet(tmp_path, capsys, monkeypatch, small_batches):
    path, config = mbox_config(tmp_path, 25)
    screens = []

    def on_terminal(*, service=False):
        out, console = terminal()
        screens.append(out)
        return Progress(terminal=True, service=service, console=console)

    monkeypatch.setattr(Progress, "for_stderr", staticmethod(on_terminal))
    assert cli.main(["import", "mbox", str(path), "-c", str(config), "--name", "takeout"]) == 0
    assert len(screens) == 1
    screen = screens[0].getvalue()
    assert "takeout messages" in screen and "25/25" in screen and "eta 0:00:00" in screen
    # On a terminal the bar replaces the progress events.
    assert events(capsys.readouterr().err) == []

    screens.clear()
    assert cli.main(["import", "mbox", str(path), "-c", str(config), "--name", "again", "--quiet"]) == 0
    assert screens == []  # not even built
    assert events(capsys.readouterr().err) == []


def test_run_once_quiet_flag_is_accepted(tmp_path, capsys):
    # `run` takes --quiet too (its wiring is the same as import's: no Progress at all).
    args = cli._parser().parse_args(["run", "--once", "--quiet", "-c", str(tmp_path / "c.yaml")])
    assert args.quiet and cli._progress(args) is None
    assert isinstance(cli._progress(cli._parser().parse_args(["run", "--once"])), Progress)


# -- the terminal mode --------------------------------------------------------------------------


async def test_bar_shows_done_of_total_and_logs_go_above_it(tmp_path, memory_store, restore_logging):
    path = tmp_path / "a.mbox"
    write_mbox(path, 25)
    logs.configure("info", json=False)
    out, console = terminal()
    bars = Progress(terminal=True, console=console)
    runner = Runner([MboxConnector(path, parser(), batch_size=10)], StoreSink(memory_store), once=True, listeners=[bars])
    bars.runner = runner
    before = sys.stderr
    with bars:
        assert await runner.run()
        assert sys.stderr is not before  # log lines are routed through the console while bars show
    assert sys.stderr is before
    screen = out.getvalue()
    assert "mbox-a.mbox messages" in screen
    for shown in ("10/25", "20/25", "25/25"):
        assert shown in screen
    logged = [line for line in screen.splitlines() if "batch_stored" in line]
    # The first batch's event comes before any bar (the bars start with its callback); the other two go above them.
    assert len(logged) == 2
    for line in logged:
        # Each log line starts on a cleared line of its own: the bar is redrawn after it, never into it.
        text = line.rsplit("\x1b[2K", 1)[-1]
        assert text.startswith("20") and "━" not in text and "/25" not in text


def test_unknown_total_shows_a_count_and_rate():
    out, console = terminal()
    clock = Clock()
    bars = Progress(terminal=True, console=console, clock=clock)
    bars.runner = fake_runner(twilio=None)
    with bars:
        bars.batch_stored("twilio", batch(50, "calls"), 0.1)
        clock.now += 10
        bars.batch_stored("twilio", batch(100, "messages"), 0.1)
    screen = out.getvalue()
    assert "twilio messages" in screen and "150" in screen and "10.0/s" in screen
    assert "150/" not in screen and "eta" not in screen


# -- events, rate and ETA on a fake clock --------------------------------------------------------


def test_events_at_most_every_interval_with_rate_and_eta():
    clock = Clock()
    p = Progress(terminal=False, clock=clock)
    runner = p.runner = fake_runner(box=1000)
    with capture_logs() as logged:
        for done in range(100, 1100, 100):
            runner.status["box"].backlog = 1000 - done
            p.batch_stored("box", batch(100), 0.5)
            clock.now += 4
        runner.status["box"].backlog = 0
        p.pass_succeeded(runner.status["box"])
    found = [e for e in logged if e["event"] == "progress"]
    # Batches at t=0,4,...,36: events at t=12, 24, 36 (10 s apart at least), and the final one at t=40.
    assert [(e["done"], e["total"]) for e in found] == [(400, 1000), (700, 1000), (1000, 1000), (1000, 1000)]
    # 100 items every 4 s since the first batch: 25/s; 600 left at 25/s is 24 s.
    assert (found[0]["rate_per_s"], found[0]["eta_s"]) == (25.0, 24)
    assert found[-1] == {
        "event": "progress", "log_level": "info", "source": "box", "stream": "INBOX",
        "done": 1000, "total": 1000, "rate_per_s": 22.5, "eta_s": 0, "final": True,
    }


def test_total_counts_skipped_items_and_grows_with_the_next_folder():
    clock = Clock()
    p = Progress(terminal=False, clock=clock, every=0)
    runner = p.runner = fake_runner(box=3)
    with capture_logs() as logged:
        p.batch_stored("box", batch(1, skipped=1), 0.1)
        runner.status["box"].backlog = 0
        clock.now += 1
        p.batch_stored("box", batch(3), 0.1)
        runner.status["box"].backlog = 4  # Sent scanned: 4 more to read
        clock.now += 1
        p.batch_stored("box", batch(2, "Sent"), 0.1)
    assert [(e["stream"], e["done"], e["total"]) for e in logged] == [("INBOX", 2, 5), ("INBOX", 5, 5), ("Sent", 7, 11)]


def test_a_failed_pass_ends_with_what_it_knew():
    clock = Clock()
    p = Progress(terminal=False, clock=clock)
    runner = p.runner = fake_runner(box=90)
    with capture_logs() as logged:
        p.batch_stored("box", batch(10), 0.1)
        clock.now += 1
        p.pass_failed(runner.status["box"])
    assert [(e["done"], e["total"], e["eta_s"], e["final"]) for e in logged] == [(10, 100, None, True)]


def test_one_off_run_reports_a_source_with_nothing_new():
    p = Progress(terminal=False, clock=Clock())
    p.runner = fake_runner(box=0)
    with capture_logs() as logged:
        p.pass_succeeded(p.runner.status["box"])
    assert [(e["source"], e["done"], e["total"], e["final"]) for e in logged] == [("box", 0, 0, True)]


# -- the long-running service: only while a source has a backlog ---------------------------------


def test_service_is_silent_for_steady_passes_and_reports_a_backlog():
    clock = Clock()
    p = Progress(terminal=False, service=True, clock=clock, every=0)
    runner = p.runner = fake_runner(box=0, twilio=None)
    with capture_logs() as logged:
        # Steady passes: a few new items, caught up after the batch; a source with no backlog at all.
        p.batch_stored("box", batch(3), 0.1)
        p.pass_succeeded(runner.status["box"])
        p.batch_stored("twilio", batch(5, "calls"), 0.1)
        p.pass_succeeded(runner.status["twilio"])
        assert logged == []
        # A first sync: shown while the backlog lasts, with a last word at the end of the pass.
        runner.status["box"].backlog = 500
        p.batch_stored("box", batch(500), 1.0)
        clock.now += 10
        runner.status["box"].backlog = 0
        p.batch_stored("box", batch(500), 1.0)
        p.pass_succeeded(runner.status["box"])
        # The next pass is a steady one again.
        p.batch_stored("box", batch(2), 0.1)
        p.pass_succeeded(runner.status["box"])
    assert [(e["done"], e["total"], e.get("final", False)) for e in logged] == [(500, 1000, False), (1000, 1000, False), (1000, 1000, True)]


def test_service_bar_goes_away_when_the_backlog_is_read():
    out, console = terminal()
    p = Progress(terminal=True, service=True, console=console, clock=Clock())
    runner = p.runner = fake_runner(box=5, other=7)
    before = sys.stderr
    p.batch_stored("box", batch(5), 0.1)
    p.batch_stored("other", batch(1), 0.1)
    assert "box INBOX" in out.getvalue() and "5/10" in out.getvalue()
    runner.status["box"].backlog = 0
    p.pass_succeeded(runner.status["box"])
    assert sys.stderr is not before  # "other" still has its backlog
    p.source_removed("other")
    # No bar left: the display is down and stderr is the terminal's again.
    assert sys.stderr is before
    p.close()


# -- IMAP against the tests' Dovecot ---------------------------------------------------------------


async def test_imap_first_sync_reports_its_folders_total(dovecot, imap_user, memory_store):
    for i in range(5):
        dovecot.append(imap_user.name, "INBOX", message(i))
    for i in range(3):
        dovecot.append(imap_user.name, "Sent", message(10 + i, sender=f"{imap_user.name}@ourco.example", to="alice@example.com"))
    settings = settings_from_dict(
        {
            "mongodb": {"uri": "memory://"},
            "internal_domains": ["ourco.example"],
            "mailboxes": [dovecot.mailbox(imap_user, name="box0", addresses=[f"{imap_user.name}@ourco.example"]) | {"batch_size": 2}],
            "daemon": {"parse_workers": 1},
        }
    )
    p = Progress(terminal=False, every=0)
    runner = Runner(app.build_connectors(settings, None), StoreSink(memory_store), once=True, listeners=[p])
    p.runner = runner
    with capture_logs() as logged:
        assert await runner.run()
    found = [(e["stream"], e["done"], e["total"], e.get("final", False)) for e in logged if e["event"] == "progress"]
    # Batches of 2 out of INBOX's 5 messages: the folder's total is known from the first batch on.
    # Then Sent (found through SPECIAL-USE) is scanned and its 3 join the total.
    assert found == [
        ("INBOX", 2, 5, False), ("INBOX", 4, 5, False), ("INBOX", 5, 5, False),
        ("Sent", 7, 8, False), ("Sent", 8, 8, False), ("Sent", 8, 8, True),
    ]


def test_service_reports_a_first_sync(dovecot, imap_user, tmp_path):
    # `commsync run` as systemd runs it (stderr a pipe): the first sync's backlog ends with a `progress` event.
    for i in range(12):
        dovecot.append(imap_user.name, "INBOX", message(i))
    config = service_process.write_config(tmp_path / "c.yaml", [service_process.mailbox(dovecot, imap_user, "m", batch_size=4)])
    daemon = service_process.Daemon(config, {"PW_M": imap_user.password})
    try:
        final = daemon.wait_for("progress", source="m", final=True)
    finally:
        assert daemon.stop() == 0, daemon.tail()
    assert (final["stream"], final["done"], final["total"], final["eta_s"]) == ("INBOX", 12, 12, 0)
