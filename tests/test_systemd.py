"""The unit under a real systemd: install.sh in a booted Debian container, then the service's life.

One container (tests/nspawn.py) is booted for the module; `systemd/install.sh`
installs this checkout inside exactly as README.md says, and the service runs
against a Dovecot, a MongoDB server (SecantusDB) and an OAuth2 server the
module starts on 127.0.0.1 (the container shares the host's network). Each
test leaves the service running with the base configuration.

Skipped, saying why, where no container can boot (not root, no
systemd-nspawn); under CI=true that is a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import threading
import time
import uuid
from pathlib import Path

import pymongo
import pytest

from commsync.config.secrets import read_secret
from commsync.daemon.auth_cli import save_refresh_token

import nspawn
from dovecot import DovecotServer, _missing_requirement
from eventually import eventually
from mailgen import message
from mongo_server import MongoTestServer, server_binary
from oauth_server import OAuthServer, wait_until

REPO = Path(__file__).resolve().parents[1]
UNIT = "commsync"
COMMSYNC = "/opt/commsync/venv/bin/commsync"
CONFIG = "/etc/commsync/commsync.yaml"
CREDENTIALS = "/etc/commsync/credentials"
DROPINS = "/etc/systemd/system/commsync.service.d"
LEASE_TTL = 30  # seconds; a restart that waits for its predecessor's leases waits this long
EXPOSURE = 1.1  # `systemd-analyze security commsync` when this suite was written

container_test = [pytest.mark.integration, pytest.mark.timeout(600)]


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"systemd container unavailable: {reason} -- required when CI is set", pytrace=False)
    pytest.skip(f"systemd container unavailable: {reason}")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """The booted container with commsync installed by install.sh from a copy of this checkout."""
    reason = nspawn.missing_requirement()
    if reason:
        _unavailable(reason)
    try:
        root = nspawn.rootfs(log=lambda line: print(line, flush=True))
        box = nspawn.Container(root, f"commsync-{uuid.uuid4().hex[:6]}", log_path=tmp_path_factory.mktemp("nspawn") / "console.log")
        box.boot()
    except nspawn.Unavailable as exc:
        _unavailable(str(exc))
    try:
        # The checkout as `git clone` gives it (no venv, no caches), then the README's command.
        _copy_checkout(box)
        started = time.monotonic()
        box.install = box.run("cd /root/commsync && bash systemd/install.sh", timeout=600)
        box.install_seconds = time.monotonic() - started
        yield box
    finally:
        box.poweroff()


def _copy_checkout(box: nspawn.Container) -> None:
    import subprocess

    excludes = [".venv", ".git", "__pycache__", "*.egg-info", "build", ".pytest_cache", ".ruff_cache"]
    tar = subprocess.run(["tar", "-c", "-C", str(REPO), *(f"--exclude={e}" for e in excludes), "."], capture_output=True, check=True)
    box.run("mkdir -p /root/commsync && tar -x -C /root/commsync", input=tar.stdout)


@pytest.fixture(scope="module")
def oauth():
    with OAuthServer() as server:
        yield server


@pytest.fixture(scope="module")
def imap(oauth):
    """A Dovecot of the module's own: passwords, and XOAUTH2 tokens checked with ``oauth``."""
    missing = _missing_requirement()
    if missing:
        _unavailable(f"real Dovecot IMAP server unavailable: {missing}")
    with DovecotServer(oauth2_introspection_url=oauth.introspection_url) as server:
        yield server


@pytest.fixture(scope="module")
def mongo():
    """A MongoDB server of the module's own: one test stops it."""
    if server_binary() is None:
        _unavailable("secantusd-py not installed (pip install -e '.[test]')")
    with MongoTestServer() as server:
        yield server


class Service:
    """The installed service and what it is configured with."""

    def __init__(self, box: nspawn.Container, imap: DovecotServer, mongo: MongoTestServer):
        self.box, self.imap, self.mongo = box, imap, mongo
        self.database = f"commsync_systemd_{uuid.uuid4().hex[:8]}"
        self.sales = imap.new_user("sales")
        self.extra: list[dict] = []

    # configuration
    def mailbox(self, user, name: str, **keys) -> dict:
        return self.imap.mailbox(user, name=name, folders=["INBOX"], idle=True, **keys)

    def config(self) -> dict:
        return {
            "mongodb": {"uri": self.mongo.uri, "database": self.database, "server_selection_timeout": "5s"},
            "internal_domains": ["ourco.example"],
            "daemon": {"poll_interval": "1m", "lease_ttl": f"{LEASE_TTL}s", "parse_workers": 1},
            "mailboxes": [self.mailbox(self.sales, "sales", password=None, password_file="sales"), *self.extra],
        }

    def write_config(self) -> None:
        # JSON is YAML; 0644 as install.sh leaves it: no secret in it.
        self.box.write(CONFIG, json.dumps(self.config(), indent=2), "0644")

    def credential(self, name: str, value: str) -> None:
        self.box.write(f"{CREDENTIALS}/{name}", value + "\n", "0600")

    # state
    def show(self, *props: str) -> dict[str, str]:
        return self.box.show(UNIT, *props)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def active(self) -> bool:
        return self.show("ActiveState")["ActiveState"] == "active"

    def systemctl(self, *args: str, check: bool = True):
        return self.box.run("systemctl " + shlex.join(args), check=check)

    async def start_clean(self) -> None:
        """Back to the base configuration, running and ready."""
        self.extra = []
        self.box.run(f"rm -rf {DROPINS}/50-test-*.conf && systemctl daemon-reload")
        self.write_config()
        await self.restart()
        assert self.active(), self.box.run(f"systemctl status {UNIT} --no-pager -l", check=False).stdout

    async def restart(self, verb: str = "restart") -> None:
        """(Re)start, then wait until every source has started (taken its lease).

        `systemctl restart` returns at READY=1 (Type=notify); the leases come a moment
        later, and a test that stops the service must not race them.
        """
        before = self.box.cursor()
        self.systemctl(*verb.split(), UNIT)
        sources = {m["name"] for m in self.config()["mailboxes"]}

        def started():
            return sources <= {e.get("source") for e in self.events(before) if e["event"] == "source_started"}

        await eventually(started, timeout=LEASE_TTL + 20, interval=0.2, what=f"sources {sorted(sources)} started")

    # mail and records
    def records(self):
        return pymongo.MongoClient(self.mongo.uri, serverSelectionTimeoutMS=5000)[self.database]["records"]

    def send(self, user) -> str:
        subject = f"systemd test {uuid.uuid4().hex[:10]}"
        self.imap.append(user.name, "INBOX", message(1, sender="alice@example.com", to=f"{user.name}@ourco.example", subject=subject))
        return subject

    async def captured(self, subject: str, timeout: float = 20.0) -> float:
        """Seconds until the record of ``subject`` is in MongoDB."""
        started = time.monotonic()
        with pymongo.MongoClient(self.mongo.uri, serverSelectionTimeoutMS=5000) as client:
            records = client[self.database]["records"]
            try:
                await eventually(lambda: records.find_one({"subject": subject}), timeout=timeout, interval=0.1, what=f"record {subject!r} in MongoDB")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{self.journal_tail()}") from None
        return time.monotonic() - started

    def journal_tail(self, lines: int = 40) -> str:
        return self.box.run(f"journalctl -u {UNIT} -n {lines} --no-pager -o short-monotonic", check=False).stdout

    def events(self, after: str, *args: str) -> list[dict]:
        """The daemon's own JSON events since ``after``, with the journal's PRIORITY as ``_priority``."""
        out = []
        for entry in self.box.journal("-u", UNIT, "-t", "commsync", *args, after=after):
            try:
                event = json.loads(entry["MESSAGE"])
            except (ValueError, TypeError):
                continue
            event["_priority"] = entry.get("PRIORITY")
            out.append(event)
        return out

    def systemd_lines(self, after: str) -> list[str]:
        """What systemd itself logged about the unit since ``after``."""
        return [str(e.get("MESSAGE")) for e in self.box.journal("-u", UNIT, "-t", "systemd", after=after)]


@pytest.fixture(scope="module")
def service(machine, imap, mongo):
    """The service installed and configured with one password mailbox (`sales`) through a credential."""
    svc = Service(machine, imap, mongo)
    svc.credential("sales", svc.sales.password)
    svc.write_config()
    yield svc


@pytest.fixture
async def fresh(service):
    """The service in its base configuration, ready, for one test; restored after it."""
    if not service.active():
        await service.restart("enable --now")  # the README's command
    yield service
    if not service.mongo.running:
        service.mongo.start()
    await service.start_clean()


# --------------------------------------------------------------------------- tests: without a container


def test_a_directory_credential_is_found_by_its_file_name(tmp_path, monkeypatch):
    # LoadCredential=commsync:/etc/commsync/credentials names the file `sales` commsync_sales.
    (tmp_path / "commsync_sales").write_text("pw-from-directory\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret(None, Path("sales"), None) == "pw-from-directory"
    # A LoadCredential=sales:... line of its own (the old drop-ins) wins.
    (tmp_path / "sales").write_text("pw-own-line\n")
    assert read_secret(None, Path("sales"), None) == "pw-own-line"


def test_a_credential_added_after_start_names_the_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot read .*/support: No such file or directory; .*restart the service"):
        read_secret(None, Path("support"), None)


def test_auth_login_gives_the_token_to_the_state_directory_owner(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chown needs root (as `sudo commsync auth login` has)")
    state = tmp_path / "commsync"
    state.mkdir(mode=0o700)
    os.chown(state, 61234, 61234)  # the service's dynamic user
    save_refresh_token(state / "box.token", "rt-123")
    st = (state / "box.token").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (61234, 61234, 0o600)
    # A directory of root's own: the file stays root's.
    save_refresh_token(tmp_path / "mine.token", "rt-456")
    assert (tmp_path / "mine.token").stat().st_uid == 0


# --------------------------------------------------------------------------- tests: the unit under systemd


@pytest.mark.usefixtures("fresh")
class TestUnderSystemd:
    pytestmark = container_test

    async def test_installs_and_reports_ready_with_a_status_line_then_captures_new_mail(self, service, machine):
        # install.sh ran `systemd-analyze verify` (set -e) and daemon-reload.
        assert "install.sh: installed" in machine.install.stdout
        print(f"install.sh: {machine.install_seconds:.1f} s; boot: {machine.boot_seconds:.1f} s")
        props = service.show("Type", "ActiveState", "SubState", "StatusText", "NotifyAccess", "User")
        assert props["Type"] == "notify" and (props["ActiveState"], props["SubState"]) == ("active", "running")
        # A connection per mailbox: systemd's default soft limit of 1,024 would cap an instance near 1,000.
        # systemd clamps LimitNOFILE to its own hard limit (20,000 in the container on these machines).
        def open_files(pid: int | str) -> tuple[int, int]:
            limits = service.box.run(f"cat /proc/{pid}/limits").stdout
            soft, hard = re.search(r"^Max open files\s+(\d+)\s+(\d+)\s+files", limits, re.M).groups()
            return int(soft), int(hard)

        ceiling = min(65536, open_files(1)[1])
        assert ceiling > 1024 and open_files(service.main_pid()) == (ceiling, ceiling)
        # Right after READY the lease may not be taken yet: "1 sources (0 here); ...".
        assert re.fullmatch(r"1 sources( \(\d here\))?; last batch (none yet|\d\d:\d\d:\d\d sales \+\d+); no errors", props["StatusText"]), props
        subject = service.send(service.sales)
        await service.captured(subject)

        def status_names_the_batch():
            text = service.show("StatusText")["StatusText"]
            return re.fullmatch(r"1 sources; last batch \d\d:\d\d:\d\d sales \+1; no errors", text)

        await eventually(status_names_the_batch, timeout=15, interval=0.2, what="STATUS= naming the batch")

    async def test_journal_recipe_parses_and_each_line_has_its_priority(self, service, machine):
        before = machine.cursor()
        # An error to find: a mailbox whose password is wrong.
        wrong = service.imap.new_user("wrong")
        service.extra = [service.mailbox(wrong, "wrong", password="not-" + wrong.password)]
        service.write_config()
        service.systemctl("reload", UNIT)
        await eventually(lambda: any(e["event"] == "source_failed" for e in service.events(before)), timeout=30, interval=0.5, what="source_failed")
        # Only the daemon's lines, each one JSON: no "Starting..." from systemd in between.
        strict = machine.run(f"journalctl -u {UNIT} -t commsync -o cat --no-pager | jq -c .event", check=False)
        assert strict.returncode == 0, strict.stderr
        assert '"started"' in strict.stdout and '"source_failed"' in strict.stdout
        # The README's recipes, as written there.
        follow = machine.run(f"journalctl -u {UNIT} -t commsync -o cat --no-pager | jq -cR 'fromjson? // .'")
        assert all(isinstance(json.loads(line), dict) for line in follow.stdout.splitlines()), follow.stdout[-2000:]
        failed = machine.run(f"journalctl -u {UNIT} -t commsync -o cat --no-pager | jq -cR 'fromjson? | select(.event == \"source_failed\")'")
        assert failed.stdout and all(json.loads(line)["source"] == "wrong" for line in failed.stdout.splitlines())
        plain = machine.run(f"journalctl -u {UNIT} -p err -o cat --no-pager").stdout.splitlines()
        assert any('"source_failed"' in line for line in plain) and not any('"batch_stored"' in line for line in plain)
        # -p err finds the errors, and only them.
        errors = [json.loads(e["MESSAGE"]) for e in machine.journal("-u", UNIT, "-t", "commsync", "-p", "err", after=before)]
        assert errors and all(e["level"] in ("error", "critical") for e in errors), errors
        assert any(e["event"] == "source_failed" for e in errors)
        # Every line of the daemon: PRIORITY as its level says.
        expected = {"debug": "7", "info": "6", "warning": "4", "error": "3", "critical": "2"}
        events = service.events(before)
        assert {e["level"] for e in events} >= {"info", "error"}
        assert [(e["event"], e["level"], e["_priority"]) for e in events if expected[e["level"]] != e["_priority"]] == []

    async def test_a_new_credential_needs_a_restart_not_a_reload(self, service, machine):
        support = service.imap.new_user("support")
        service.credential("support", support.password)
        service.extra = [service.mailbox(support, "support", password=None, password_file="support")]
        service.write_config()
        before = machine.cursor()
        pid = service.main_pid()
        service.systemctl("reload", UNIT)
        failed = await eventually(
            lambda: [e for e in service.events(before) if e["event"] == "reload_failed"], timeout=20, interval=0.3, what="reload_failed"
        )
        text = json.dumps(failed[0])
        assert "/run/credentials/commsync.service/support" in text and "restart the service" in text, text
        assert failed[0]["_priority"] == "3"
        # The running service keeps its sources and goes on capturing.
        assert service.main_pid() == pid and service.active()
        await service.captured(service.send(service.sales))
        # A restart hands the new file over (as commsync_support) and the mailbox is captured.
        await service.restart()
        assert service.show("StatusText")["StatusText"].startswith("2 sources")
        await service.captured(service.send(support))

    async def test_auth_login_token_in_the_state_directory_is_the_services(self, service, machine, oauth):
        user = service.imap.new_user("oauth")
        client = oauth.add_app(secret=None)
        machine.write("/etc/commsync/oauth-ca.pem", Path(oauth.ca_file).read_text())
        auth = {
            "method": "oauth2",
            "provider": "generic",
            "token_url": oauth.token_url,
            "device_authorization_url": oauth.device_url,
            "client_id": client.client_id,
            "refresh_token_file": "oauth.token",
            "scope": "imap offline_access",
            "ca_file": "/etc/commsync/oauth-ca.pem",
        }
        service.extra = [service.mailbox(user, "oauthbox", password=None, auth=auth)]
        service.write_config()
        # The README's procedure: the service has run (the directory exists), root signs in, restart.
        approver = threading.Thread(target=lambda: wait_until(lambda: oauth.devices, 60) and oauth.approve_devices(user.name))
        approver.start()
        login = machine.run(f"env STATE_DIRECTORY=/var/lib/commsync {COMMSYNC} auth login oauthbox -c {CONFIG}", check=False, timeout=120)
        approver.join()
        assert login.returncode == 0, login.stdout + login.stderr
        assert "Saved the refresh token for oauthbox to /var/lib/commsync/oauth.token" in login.stdout
        directory = machine.run("stat -L -c '%u %g %a' /var/lib/commsync").stdout.split()
        token = machine.run("stat -c '%u %g %a' /var/lib/commsync/oauth.token").stdout.split()
        assert directory[0] != "0" and token == [directory[0], directory[1], "600"], (directory, token)
        await service.restart()
        await service.captured(service.send(user))
        assert "no errors" in service.show("StatusText")["StatusText"]

    async def test_watchdog_restarts_a_stopped_service_which_captures_again_at_once(self, service, machine):
        machine.write(f"{DROPINS}/50-test-watchdog.conf", "[Service]\nWatchdogSec=4s\nRestartSec=1s\n")
        service.systemctl("daemon-reload")
        await service.restart()
        await service.captured(service.send(service.sales))
        restarts = int(service.show("NRestarts")["NRestarts"])
        before = machine.cursor()
        old = service.main_pid()
        machine.run(f"kill -STOP {old}")

        def restarted():
            props = service.show("NRestarts", "MainPID", "ActiveState", "SubState")
            return int(props["NRestarts"]) > restarts and props["MainPID"] not in ("0", str(old)) and props["SubState"] == "running"

        await eventually(restarted, timeout=60, interval=0.2, what="a watchdog restart")
        assert any("Failed with result 'watchdog'" in line for line in service.systemd_lines(before)), "\n".join(service.systemd_lines(before))
        # Not after lease_ttl: the new process has its predecessor's instance name, so its leases.
        seconds = await service.captured(service.send(service.sales), timeout=10)
        print(f"watchdog restart: new mail captured {seconds:.1f} s after READY (lease_ttl {LEASE_TTL} s)")

    async def test_a_stop_leaves_nothing_for_systemd_to_kill(self, service, machine):
        # Twice: right after READY (the parse pool idle), and after mail was parsed.
        leftovers = []
        for parse_first in (False, True):
            await service.restart()
            if parse_first:
                await service.captured(service.send(service.sales))
            before = machine.cursor()
            service.systemctl("stop", UNIT)
            props = service.show("Result", "ExecMainStatus", "ActiveState")
            assert (props["ActiveState"], props["ExecMainStatus"]) == ("inactive", "0"), props
            assert any(e["event"] == "stopped" for e in service.events(before))
            killed = [line for line in service.systemd_lines(before) if "Killing process" in line or "left-over process" in line]
            if killed or props["Result"] != "success":
                leftovers.append((parse_first, killed, props["Result"]))
        assert leftovers == []

    def test_exposure_stays_at_or_below_its_value(self, service, machine):
        out = machine.run(f"systemd-analyze security {UNIT} --no-pager", check=False).stdout
        match = re.search(r"Overall exposure level for commsync.service: (\d+\.\d+)", out)
        assert match, out[-2000:]
        assert float(match.group(1)) <= EXPOSURE, out

    def test_ip_allow_list_dropin_as_documented_narrows_it(self, service, machine):
        # The README's drop-in: the unit sets no allow list of its own (an IPAddressAllow=any
        # there would stay in force), so these two lines are the whole list.
        machine.write(f"{DROPINS}/50-test-ip.conf", "[Service]\nIPAddressDeny=any\nIPAddressAllow=10.0.0.0/8 localhost\n")
        service.systemctl("daemon-reload")
        props = service.show("IPAddressAllow", "IPAddressDeny")
        assert sorted(props["IPAddressDeny"].split()) == ["0.0.0.0/0", "::/0"], props
        assert sorted(props["IPAddressAllow"].split()) == sorted(["10.0.0.0/8", "127.0.0.0/8", "::1/128"]), props

    async def test_mongodb_gone_at_stop_logs_no_contradiction(self, service, machine):
        await service.captured(service.send(service.sales))
        before = machine.cursor()
        service.mongo.stop()
        service.systemctl("stop", UNIT)
        names = [(e["event"], e.get("sources")) for e in service.events(before) if e["event"].startswith("lease")]
        failed = [n for n, _ in names if n in ("lease_release_failed", "leases_not_released")]
        released = [s for n, s in names if n == "leases_released" and s]
        # Said once, and not contradicted by a "leases_released" that did not happen.
        assert failed and not released, names
