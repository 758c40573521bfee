"""The daemon as systemd runs it: a real process, real signals, a real notify socket, the unit file."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mailgen import message

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "commsync.service"


class Daemon:
    """`commsync run` in a subprocess; its JSON log events collected as they come."""

    def __init__(self, config: Path, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "commsync.daemon.cli", "run", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            text=True,
        )
        self.events: list[dict] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "_raw", "line": line}
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self.events.append({"event": "_eof"})
            self._changed.notify_all()

    def mark(self) -> int:
        with self._changed:
            return len(self.events)

    def wait_for(self, event: str, since: int = 0, timeout: float = 30, **fields) -> dict:
        """The first event named ``event`` (with ``fields``) at index >= ``since``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for e in self.events[since:]:
                    if e.get("event") == event and all(e.get(k) == v for k, v in fields.items()):
                        return e
                if self.events and self.events[-1]["event"] == "_eof":
                    raise AssertionError(f"daemon exited before {event} {fields}: {self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {event} {fields} within {timeout}s: {self.tail()}")
                self._changed.wait(left)

    def named(self, event: str, since: int = 0, **fields) -> list[dict]:
        with self._changed:
            return [e for e in self.events[since:] if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    def tail(self, n: int = 15) -> str:
        return "\n".join(json.dumps(e)[:300] for e in self.events[-n:])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)
        if sig == signal.SIGTERM:
            self.terminated = True

    terminated = False

    def stop(self) -> int:
        """SIGTERM (unless the test sent it already), then wait for the exit code."""
        if not self.terminated and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.finish()

    def finish(self, timeout: float = 30) -> int:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def mailbox(dovecot, user, name, **extra):
    return dovecot.mailbox(user, name=name, password=None, password_env=f"PW_{name.upper()}", folders=["INBOX"], **extra)


def write_config(path: Path, mailboxes: list[dict], **top) -> Path:
    data = {
        "mongodb": {"uri": "memory://"},
        "daemon": {"poll_interval": "30s", "parse_workers": 1, "backoff_max": "2s"},
        "mailboxes": mailboxes,
        **top,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))  # JSON is YAML
    tmp.replace(path)
    return path


def receive_until(sock, wanted, timeout: float = 30) -> list[bytes]:
    """Every datagram until one contains ``wanted`` (a bytes line)."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096))
        except TimeoutError:
            continue
        if wanted in got[-1].split(b"\n"):
            return got
    raise AssertionError(f"no {wanted!r} within {timeout}s; got {got[-10:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ready_watchdog_status_and_stopping_reach_notify_socket(dovecot, imap_user, tmp_path, notify_socket):
    dovecot.append(imap_user.name, "INBOX", message(1))
    address, sock = notify_socket
    port = free_port()
    config = write_config(
        tmp_path / "c.yaml",
        [mailbox(dovecot, imap_user, "m")],
        daemon={"poll_interval": "30s", "parse_workers": 1, "http": {"listen": f"127.0.0.1:{port}"}},
    )
    daemon = Daemon(config, {"PW_M": imap_user.password, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
    try:
        before_ready = receive_until(sock, b"READY=1")
        started = daemon.wait_for("started")
        assert started["watchdog"] is True
        # READY only after MongoDB answered: "connecting" came first, then READY with a status line.
        assert b"STATUS=connecting to MongoDB" in before_ready[0] or any(b"connecting" in d for d in before_ready)
        assert re.search(rb"^READY=1\nSTATUS=1 sources", before_ready[-1])
        pings = []
        deadline = time.monotonic() + 10
        while len(pings) < 4 and time.monotonic() < deadline:
            try:
                pings.append(sock.recv(4096))
            except TimeoutError:
                pass
        assert [p for p in pings if p == b"WATCHDOG=1"][:3] == [b"WATCHDOG=1"] * 3, pings
        daemon.wait_for("batch_stored", source="m")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert json.load(response)["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert 'commsync_records_captured_total{channel="email",source="m"} 1.0' in response.read().decode()
        daemon.signal(signal.SIGTERM)
        receive_until(sock, b"STOPPING=1")
    finally:
        code = daemon.stop()
    assert code == 0, daemon.tail()
    assert daemon.events[-2]["event"] == "stopped"


def test_no_ready_while_mongodb_is_unreachable(dovecot, imap_user, tmp_path, notify_socket):
    address, sock = notify_socket
    sock.settimeout(0.5)  # below: read until the daemon has gone quiet
    config = write_config(
        tmp_path / "c.yaml",
        [mailbox(dovecot, imap_user, "m")],
        mongodb={"uri": "mongodb://127.0.0.1:9", "server_selection_timeout": "1s"},
    )
    daemon = Daemon(config, {"PW_M": imap_user.password, "NOTIFY_SOCKET": address})
    code = daemon.finish()
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except TimeoutError:
            break
    assert code == 1  # Restart=on-failure tries again
    assert daemon.named("mongodb_unreachable")
    assert not any(b"READY=1" in d for d in got), got


def test_sigterm_mid_run_stores_and_checkpoints_the_batch_in_hand(dovecot, imap_user, tmp_path):
    client = dovecot.client(imap_user.name)
    for i in range(120):
        client.append("INBOX", message(i))
    client.logout()
    config = write_config(tmp_path / "c.yaml", [mailbox(dovecot, imap_user, "m", batch_size=4)], log_level="debug")
    daemon = Daemon(config, {"PW_M": imap_user.password})
    try:
        first = daemon.wait_for("batch_stored", source="m")
        daemon.wait_for("batch_stored", since=daemon.events.index(first) + 1, source="m")
        daemon.signal(signal.SIGTERM)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.tail()
    names = [e["event"] for e in daemon.events if e["event"] in ("batch_stored", "checkpoint_saved", "stopping", "stopped")]
    assert names[-1] == "stopped" and "stopping" in names
    stores = [e for e in daemon.events if e["event"] in ("batch_stored", "checkpoint_saved")]
    # Every stored batch was checkpointed right after, and nothing was checkpointed unstored.
    assert [e["event"] for e in stores] == ["batch_stored", "checkpoint_saved"] * (len(stores) // 2)
    stored = sum(e["records"] for e in stores if e["event"] == "batch_stored")
    assert stores[-1]["checkpoint"]["last_uid"] == stored
    assert 8 <= stored < 120  # stopped in the middle, not after the whole folder


def test_sighup_adds_removes_and_restarts_sources_and_survives_a_bad_file(dovecot, tmp_path):
    a, b = dovecot.new_user("a"), dovecot.new_user("b")
    dovecot.append(a.name, "INBOX", message(1))
    dovecot.append(b.name, "INBOX", message(2))
    config = tmp_path / "c.yaml"
    write_config(config, [mailbox(dovecot, a, "a")])
    daemon = Daemon(config, {"PW_A": a.password, "PW_B": b.password})
    try:
        daemon.wait_for("batch_stored", source="a")

        # Swap a for b.
        mark = daemon.mark()
        write_config(config, [mailbox(dovecot, b, "b")])
        daemon.signal(signal.SIGHUP)
        reloaded = daemon.wait_for("reloaded", since=mark)
        assert (reloaded["added"], reloaded["removed"], reloaded["restarted"]) == (["b"], ["a"], [])
        daemon.wait_for("source_removed", since=mark, source="a")
        first = daemon.wait_for("batch_stored", since=mark, source="b")
        after_first = daemon.events.index(first) + 1
        dovecot.append(a.name, "INBOX", message(3))  # a is gone: not captured
        dovecot.append(b.name, "INBOX", message(4))  # b is watched: captured (IDLE)
        daemon.wait_for("batch_stored", since=after_first, source="b")
        assert daemon.named("batch_stored", mark, source="a") == []

        # A changed source restarts.
        mark = daemon.mark()
        write_config(config, [mailbox(dovecot, b, "b", batch_size=10)])
        daemon.signal(signal.SIGHUP)
        reloaded = daemon.wait_for("reloaded", since=mark)
        assert (reloaded["added"], reloaded["removed"], reloaded["restarted"]) == ([], [], ["b"])
        daemon.wait_for("source_removed", since=mark, source="b")
        daemon.wait_for("folder_scan", since=mark, source="b")

        # A broken file is logged and changes nothing.
        mark = daemon.mark()
        config.write_text("mailboxes: [\n")
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_for("reload_failed", since=mark)
        assert "not valid YAML" in failed["error"]
        dovecot.append(b.name, "INBOX", message(5))
        daemon.wait_for("batch_stored", since=mark, source="b")
        assert daemon.named("reloaded", mark) == []

        daemon.signal(signal.SIGTERM)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.tail()
    assert b.password not in json.dumps(daemon.events) and a.password not in json.dumps(daemon.events)


# -- the unit file -------------------------------------------------------------------------


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (apt-get install systemd): required when CI is set", pytrace=False)
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    return found


@pytest.fixture
def installed_unit(tmp_path):
    """The unit as installed, pointing at this venv's commsync (verify checks ExecStart exists)."""
    commsync = Path(sys.executable).with_name("commsync")
    assert commsync.exists(), commsync
    unit = tmp_path / "commsync.service"
    unit.write_text(UNIT.read_text().replace("/opt/commsync/venv/bin/commsync", str(commsync)))
    return unit


def test_unit_passes_systemd_analyze_verify(installed_unit):
    tool = _systemd_analyze()
    result = subprocess.run([tool, "verify", str(installed_unit)], capture_output=True, text=True, cwd=installed_unit.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr  # no warnings either


def test_unit_security_exposure_is_low(installed_unit):
    tool = _systemd_analyze()
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(installed_unit)], capture_output=True, text=True, cwd=installed_unit.parent
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None and "--offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()[:200]}")
    assert match, result.stdout[-2000:] + result.stderr
    # 1.1 at the time of writing; what is left needs the network (AF_INET, no PrivateNetwork, any IP).
    assert float(match.group(1)) <= 1.5, result.stdout


def test_unit_values_are_the_ones_the_readme_states():
    # systemd/README.md, "Lifecycle": the service's timings and restart rules.
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, value)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "60s",
        "TimeoutStopSec": "90s",
        "KillMode": "mixed",
        "Restart": "on-failure",
        "RestartSec": "10s",
        "StartLimitIntervalSec": "0",
        "RestartPreventExitStatus": "2",
        "LimitNOFILE": "65536",
        "LoadCredential": "commsync:/etc/commsync/credentials",
    }
    assert {k: settings.get(k) for k in expected} == expected
    # The daemon's own stop deadline stays below systemd's.
    from commsync.config.models import DaemonSettings

    assert DaemonSettings().shutdown_timeout.total_seconds() == 60 < 90
