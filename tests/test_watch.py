"""`commsync watch` as a real process: change lines on stdout, resume files, outages, no change streams."""

from __future__ import annotations

import asyncio
import io
import json
import os
import queue
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bson
import pytest
from bson.timestamp import Timestamp

from commsync.daemon import admin, watch
from commsync.daemon.store import Change, Store, token_from_json

from eventually import eventually
from mongo_server import MongoTestServer
from records import email_record

COMMSYNC = Path(sys.executable).with_name("commsync")
# A change must reach stdout this soon after the write that made it returned.
LATENCY = 3.0


class Watch:
    """`commsync watch` as a child process: stdout read line by line, stderr's events collected."""

    def __init__(self, config: Path, *args: str, read: bool = True):
        self.proc = subprocess.Popen(
            [str(COMMSYNC), "watch", "-c", str(config), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._seen = threading.Condition()
        if read:
            threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            with self._seen:
                self.stderr.append(line)
                self._seen.notify_all()

    def events(self) -> list[dict]:
        out = []
        for line in list(self.stderr):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def _wait_event(self, name: str, count: int, timeout: float) -> None:
        with self._seen:
            ok = self._seen.wait_for(lambda: sum(e.get("event") == name for e in self.events()) >= count or self.proc.poll() is not None, timeout)
        assert ok and sum(e.get("event") == name for e in self.events()) >= count, f"no {name} event within {timeout}s: {self.stderr}"

    async def event(self, name: str, count: int = 1, timeout: float = 30.0) -> None:
        """Wait until stderr has carried ``count`` events named ``name``."""
        await asyncio.to_thread(self._wait_event, name, count, timeout)

    async def line(self, timeout: float = LATENCY) -> str:
        try:
            line = await asyncio.to_thread(self._lines.get, True, timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s; stderr: {''.join(self.stderr)[-2000:]}") from None
        assert line is not None, f"stdout closed; exit {self.proc.poll()}; stderr: {''.join(self.stderr)[-2000:]}"
        return line

    async def changes(self, n: int, timeout: float = LATENCY) -> list[dict]:
        return [json.loads(await self.line(timeout)) for _ in range(n)]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def error_text(self) -> str:
        return "".join(self.stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _config(tmp_path: Path, uri: str, database: str) -> Path:
    path = tmp_path / "commsync.yaml"
    path.write_text(json.dumps({"mongodb": {"uri": uri, "database": database, "server_selection_timeout": "10s"}}))
    return path


@pytest.fixture
async def db(mongodb, tmp_path):
    """A fresh database on the session's server: (store, config file)."""
    name = mongodb.database()
    store = Store.connect(mongodb.uri, name)
    await store.ensure_indexes()
    yield store, _config(tmp_path, mongodb.uri, name)
    await store.client.drop_database(name)
    store.close()


@pytest.fixture
def watches():
    """Start `commsync watch` processes; any left running are killed at the end."""
    started: list[Watch] = []

    def start(config: Path, *args: str, read: bool = True) -> Watch:
        w = Watch(config, *args, read=read)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


def _recent(iso: str) -> bool:
    return abs(datetime.fromisoformat(iso) - datetime.now(UTC)) < timedelta(minutes=1)


def _sentinel(n: int = 0) -> dict:
    return email_record(f"sentinel-{n}", "sentinel@example.com")


# -- the stream --------------------------------------------------------------------------------


async def test_inserts_updates_and_deletes_arrive_in_order_once(db, watches):
    store, config = db
    w = watches(config, "--json")
    await w.event("watch_started")

    await store.write_batch([email_record("r1"), email_record("r2")])
    inserted = await w.changes(2)
    assert [(c["_id"], c["operation"]) for c in inserted] == [("r1", "insert"), ("r2", "insert")]
    assert inserted[0]["record"]["subject"] == "subject r1" and inserted[0]["record"]["channel"] == "email"
    assert all(_recent(c["time"]) for c in inserted)

    # The same message seen in a second mailbox: one record, now with two sources.
    await store.write_batch([email_record("r1", source="support")])
    (updated,) = await w.changes(1)
    assert (updated["_id"], updated["operation"]) == ("r1", "update")
    assert sorted(s["source"] for s in updated["record"]["sources"]) == ["sales", "support"]

    await admin.delete(store, {"_id": "r2"})
    (deleted,) = await w.changes(1)
    assert deleted == {"_id": "r2", "operation": "delete", "time": deleted["time"], "record": None}

    # Nothing else came in between: the next line is the next write.
    await store.write_batch([_sentinel()])
    assert [c["_id"] for c in await w.changes(1)] == ["sentinel-0"]

    started = time.monotonic()
    assert w.stop() == 0, w.error_text()
    assert time.monotonic() - started < 5
    assert [e["event"] for e in w.events()][-1] == "watch_stopped"


async def test_a_change_reaches_stdout_within_seconds(db, watches):
    store, config = db
    w = watches(config, "--json")
    await w.event("watch_started")
    for i in range(3):
        await store.write_batch([email_record(f"r{i}")])
        written = time.monotonic()
        (change,) = await w.changes(1, timeout=LATENCY)
        assert change["_id"] == f"r{i}" and time.monotonic() - written < LATENCY


async def test_readable_lines_name_time_operation_id_channel_customers_subject(db, watches):
    store, config = db
    await store.upsert_customers([{"_id": "cust-7", "name": "Alice", "emails": ["alice@example.com"]}], origin="test")
    w = watches(config)
    await w.event("watch_started")
    await store.write_batch([email_record("r1")])
    line = await w.line()
    when, operation, rid, channel, customers, subject = line.split("  ", 5)
    assert _recent(when) and (operation.strip(), rid, channel, customers, subject) == ("insert", "r1", "email", "cust-7", "subject r1")
    await admin.delete(store, {"_id": "r1"})
    assert (await w.line()).split("  ")[1:] == ["delete", "r1"]
    assert w.stop() == 0


# -- resume files ------------------------------------------------------------------------------


async def test_a_restart_with_the_resume_file_prints_exactly_the_missed_changes(db, watches, tmp_path):
    store, config = db
    resume = tmp_path / "watch.resume"
    w = watches(config, "--json", "--resume-file", str(resume))
    await w.event("watch_started")
    await store.write_batch([email_record(f"r{i}", uid=i) for i in range(3)])
    assert [c["_id"] for c in await w.changes(3)] == ["r0", "r1", "r2"]
    assert w.stop() == 0, w.error_text()
    assert stat.S_IMODE(resume.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".watch.resume")] == []  # no temporary file left

    # While it is down.
    await store.write_batch([email_record("r3", uid=3), email_record("r4", uid=4)])
    await store.write_batch([email_record("r0", source="support")])
    await admin.delete(store, {"_id": "r1"})

    again = watches(config, "--json", "--resume-file", str(resume))
    missed = await again.changes(4)
    assert [(c["_id"], c["operation"]) for c in missed] == [("r3", "insert"), ("r4", "insert"), ("r0", "update"), ("r1", "delete")]
    await store.write_batch([_sentinel()])
    assert [c["_id"] for c in await again.changes(1)] == ["sentinel-0"]
    assert again.stop() == 0


async def test_kill_9_costs_at_most_the_last_line_printed(db, watches, tmp_path):
    store, config = db
    resume = tmp_path / "watch.resume"
    w = watches(config, "--json", "--resume-file", str(resume))
    await w.event("watch_started")
    await store.write_batch([email_record(f"r{i}", uid=i) for i in range(5)])
    assert [c["_id"] for c in await w.changes(5)] == [f"r{i}" for i in range(5)]
    assert w.stop(signal.SIGKILL) == -signal.SIGKILL
    await store.write_batch([email_record("r5", uid=5)])
    again = watches(config, "--json", "--resume-file", str(resume))
    await store.write_batch([_sentinel()])
    seen = [c["_id"] for c in await again.changes(2)]
    if seen[0] == "r4":  # killed between printing r4 and saving its position: printed once more
        seen += [c["_id"] for c in await again.changes(1)]
        seen = seen[1:]
    assert seen == ["r5", "sentinel-0"]
    again.stop()


async def test_a_first_run_that_printed_nothing_still_resumes_from_its_start(db, watches, tmp_path):
    store, config = db
    resume = tmp_path / "watch.resume"
    w = watches(config, "--json", "--resume-file", str(resume))
    await w.event("watch_started")
    assert w.stop() == 0
    await store.write_batch([email_record("while-down")])
    again = watches(config, "--json", "--resume-file", str(resume))
    assert [c["_id"] for c in await again.changes(1)] == ["while-down"]
    assert again.stop() == 0


async def test_sigint_ends_it_with_exit_0_and_saves_its_position(db, watches, tmp_path):
    store, config = db
    resume = tmp_path / "watch.resume"
    w = watches(config, "--json", "--resume-file", str(resume))
    await w.event("watch_started")
    await store.write_batch([email_record("r1")])
    await w.changes(1)
    assert w.stop(signal.SIGINT) == 0, w.error_text()
    await store.write_batch([email_record("r2")])
    again = watches(config, "--json", "--resume-file", str(resume))
    assert [c["_id"] for c in await again.changes(1)] == ["r2"]
    again.stop()


async def test_a_consumer_that_goes_away_loses_no_line(db, watches, tmp_path):
    store, config = db
    resume = tmp_path / "watch.resume"
    w = watches(config, "--json", "--resume-file", str(resume), read=False)
    await w.event("watch_started")
    w.proc.stdout.close()  # the consumer (`| my-crm-sync`) died
    await store.write_batch([email_record("unread")])
    assert w.wait() == 1
    assert "watch_output_closed" in [e["event"] for e in w.events()]
    again = watches(config, "--json", "--resume-file", str(resume))
    assert [c["_id"] for c in await again.changes(1)] == ["unread"]
    again.stop()


async def test_a_resume_token_the_server_does_not_have_exits_1_saying_how_to_start_over(db, watches, tmp_path, mongodb):
    store, config = db
    database = json.loads(config.read_text())["mongodb"]["database"]
    resume = tmp_path / "watch.resume"
    # An expired position (a SecantusDB token from the beginning of time) and a bogus one.
    expired = {"_data": bson.encode({"s": 0, "t": Timestamp(1, 1), "n": f"{database}.records", "k": {"_id": "x"}}).hex()}
    for token, server_says in ((expired, "ChangeStreamHistoryLost"), ({"_data": "00"}, "")):
        resume.write_text(json.dumps({"database": database, "saved_at": "2025-03-01T09:00:00+00:00", "token": token}))
        w = watches(config, "--json", "--resume-file", str(resume))
        assert w.wait() == 1
        text = w.error_text()
        assert "cannot resume" in text and "missed" in text, text
        assert f"delete {resume}" in text and "commsync records export --since 2025-03-01" in text, text
        assert resume.read_text().count("2025-03-01T09:00:00") == 1  # the file is left as it was
        if mongodb.secantus:
            assert server_says in text, text


async def test_an_unusable_resume_file_exits_1(db, watches, tmp_path):
    _, config = db
    resume = tmp_path / "watch.resume"
    for body, says in (("not json", "resume file"), (json.dumps({"database": "other", "token": {"_data": "00"}}), "belongs to database 'other'")):
        resume.write_text(body)
        w = watches(config, "--resume-file", str(resume))
        assert w.wait() == 1
        assert says in w.error_text()


# -- the documented consumer -------------------------------------------------------------------


def _documented_consumer() -> str:
    text = (Path(__file__).resolve().parent.parent / "daemon" / "README.md").read_text(encoding="utf-8")
    found = re.search(r'```python\n(#!/usr/bin/env python3\n"""crm-sync.*?)```', text, re.S)
    assert found, "daemon/README.md no longer shows the crm-sync example"
    return found.group(1)


def _contacts(path: Path) -> dict[str, tuple]:
    if not path.exists():
        return {}
    try:
        with sqlite3.connect(path) as db:
            return {row[0]: row[1:] for row in db.execute("SELECT id, channel, customers, subject FROM contacts")}
    except sqlite3.OperationalError:  # the table is not there yet, or the consumer holds the lock
        return {}


async def test_the_documented_crm_consumer_stays_equal_to_records_across_a_restart(db, tmp_path):
    store, config = db
    await store.upsert_customers([{"_id": "cust-7", "emails": ["alice@example.com"]}], origin="test")
    script = tmp_path / "crm-sync"
    script.write_text(_documented_consumer())
    crm, resume = tmp_path / "contacts.db", tmp_path / "watch.resume"
    pipeline = f"{COMMSYNC} watch --json -c {config} --resume-file {resume} | {sys.executable} {script}"

    def start() -> subprocess.Popen:
        # Its own process group: SIGTERM to the group is what systemd's KillMode=control-group does.
        return subprocess.Popen(
            ["bash", "-o", "pipefail", "-c", pipeline], env={**os.environ, "CRM_DB": str(crm)}, stderr=subprocess.PIPE, text=True, start_new_session=True
        )

    def stop(proc: subprocess.Popen) -> str:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)  # until both sides have closed stderr
        return err

    proc = start()
    try:
        await eventually(resume.exists, what="commsync watch started")
        await store.write_batch([email_record("r1"), email_record("r2", "bob@example.com")])
        await store.write_batch([email_record("r1", source="support")])
        await admin.delete(store, {"_id": "r2"})
        await eventually(lambda: _contacts(crm) == {"r1": ("email", "cust-7", "subject r1")}, what="the CRM table follows")
        assert '"watch_stopped"' in stop(proc)

        await store.write_batch([email_record("r3")])  # while it is down
        proc = start()
        await eventually(lambda: set(_contacts(crm)) == {"r1", "r3"}, what="the missed record applied")
        assert '"watch_stopped"' in stop(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_resume_file_in_a_missing_directory_exits_2_before_watching(tmp_path):
    config = tmp_path / "commsync.yaml"
    config.write_text(json.dumps({"mongodb": {"uri": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=100"}}))
    resume = tmp_path / "gone" / "watch.resume"
    done = subprocess.run([str(COMMSYNC), "watch", "-c", str(config), "--resume-file", str(resume)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"cannot write to {resume.parent}" in done.stderr


# -- no change streams -------------------------------------------------------------------------


def test_memory_store_exits_2_saying_a_replica_set_is_needed(tmp_path):
    config = tmp_path / "commsync.yaml"
    config.write_text(json.dumps({"mongodb": {"uri": "memory://"}}))
    done = subprocess.run([str(COMMSYNC), "watch", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "memory://" in done.stderr and "replica set" in done.stderr and done.stdout == ""


async def test_a_standalone_server_exits_2_saying_how_to_make_a_replica_set(mongodb, tmp_path, watches):
    if mongodb.server is None:
        pytest.skip("COMMSYNC_TEST_MONGODB_URI names an external server: the tests cannot start a standalone one")
    with MongoTestServer(standalone=True) as standalone:
        w = watches(_config(tmp_path, standalone.uri, "standalone"))
        assert w.wait() == 2
    text = w.error_text()
    assert "replica set" in text and "--replSet rs0" in text and "rs.initiate()" in text, text


async def test_a_dropped_records_collection_ends_the_stream_with_exit_1(db, watches):
    store, config = db
    w = watches(config, "--json")
    await w.event("watch_started")
    await store.write_batch([email_record("r1")])
    await w.changes(1)
    await store.records.drop()
    assert w.wait() == 1
    assert "dropped or renamed" in w.error_text()


# -- outages -----------------------------------------------------------------------------------


async def test_a_server_restart_while_watching_loses_nothing_and_doubles_nothing(mongodb, tmp_path, watches):
    if mongodb.server is None:
        pytest.skip("COMMSYNC_TEST_MONGODB_URI names an external server: the tests cannot restart it")
    with MongoTestServer() as server:
        config = _config(tmp_path, server.uri, "restart")
        store = Store.connect(server.uri, "restart", timeout_ms=30_000)
        try:
            w = watches(config, "--json", "--resume-file", str(tmp_path / "watch.resume"))
            await w.event("watch_started")
            await store.write_batch([email_record("before")])
            assert [c["_id"] for c in await w.changes(1)] == ["before"]

            server.stop()
            await w.event("watch_interrupted")
            server.start()
            await w.event("watch_resumed")
            await store.write_batch([email_record("after-1"), email_record("after-2")])
            assert [c["_id"] for c in await w.changes(2)] == ["after-1", "after-2"]
            await store.write_batch([_sentinel()])
            assert [c["_id"] for c in await w.changes(1)] == ["sentinel-0"]
            assert w.stop() == 0, w.error_text()
        finally:
            store.close()


async def test_changes_written_during_an_outage_arrive_after_it(mongodb, tmp_path, watches):
    """Writes between the server coming back and the watcher reconnecting are not skipped."""
    if mongodb.server is None:
        pytest.skip("COMMSYNC_TEST_MONGODB_URI names an external server: the tests cannot restart it")
    with MongoTestServer() as server:
        config = _config(tmp_path, server.uri, "outage")
        store = Store.connect(server.uri, "outage", timeout_ms=30_000)
        try:
            w = watches(config, "--json")
            await w.event("watch_started")
            await store.write_batch([email_record("before")])
            await w.changes(1)
            server.stop()
            await w.event("watch_interrupted")
            server.start()
            # Written before the watcher is back (its next attempt is a backoff away).
            await store.write_batch([email_record("meanwhile")])
            await w.event("watch_resumed")
            assert [c["_id"] for c in await w.changes(1, timeout=30)] == ["meanwhile"]
            await store.write_batch([_sentinel()])
            assert [c["_id"] for c in await w.changes(1)] == ["sentinel-0"]
            w.stop()
        finally:
            store.close()


async def test_a_server_down_at_start_is_waited_for(mongodb, tmp_path, watches):
    if mongodb.server is None:
        pytest.skip("COMMSYNC_TEST_MONGODB_URI names an external server: the tests cannot start one late")
    server = MongoTestServer()  # not started yet
    try:
        w = watches(_config(tmp_path, server.uri, "late"), "--json")
        await w.event("watch_interrupted")
        server.start()
        await w.event("watch_started", timeout=60)
        store = Store.connect(server.uri, "late", timeout_ms=30_000)
        try:
            await store.write_batch([email_record("r1")])
            assert [c["_id"] for c in await w.changes(1)] == ["r1"]
        finally:
            store.close()
        assert w.stop() == 0
    finally:
        server.close()


# -- pieces ------------------------------------------------------------------------------------


AT = datetime(2025, 3, 1, 9, 0, 5, tzinfo=UTC)


def test_json_line_carries_id_operation_time_and_record():
    record = {"_id": "r1", "occurred_at": datetime(2025, 3, 1, 9, tzinfo=UTC), "customer_ids": [bson.ObjectId("0123456789abcdef01234567")]}
    line = watch.json_line(Change("insert", "r1", AT, record))
    assert json.loads(line) == {
        "_id": "r1",
        "operation": "insert",
        "time": "2025-03-01T09:00:05+00:00",
        "record": {"_id": "r1", "occurred_at": "2025-03-01T09:00:00+00:00", "customer_ids": ["0123456789abcdef01234567"]},
    }
    assert json.loads(watch.json_line(Change("delete", "r1", AT, None)))["record"] is None


def test_text_line_keeps_to_one_line():
    record = {"channel": "sms", "customer_ids": ["a", 7], "subject": "two\nlines\r\n"}
    assert watch.text_line(Change("update", "r9", AT, record)) == "2025-03-01T09:00:05+00:00  update  r9  sms  a,7  two lines"
    assert watch.text_line(Change("update", "r9", AT, None)) == "2025-03-01T09:00:05+00:00  update  r9  -  -"
    assert watch.text_line(Change("delete", "r9", AT, None)) == "2025-03-01T09:00:05+00:00  delete  r9"


def test_resume_file_round_trip_atomic_and_private(tmp_path):
    path = tmp_path / "pos"
    f = watch.ResumeFile(path, "crm")
    assert f.load() is None
    token = {"_data": "8263A0", "extra": bson.Timestamp(5, 1)}
    f.save(token)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert watch.ResumeFile(path, "crm").load() == token
    with pytest.raises(ValueError, match="belongs to database 'crm'"):
        watch.ResumeFile(path, "other").load()
    f.save({"_data": "8263A1"})
    assert os.listdir(tmp_path) == ["pos"]
    assert watch.ResumeFile(path, "crm").load() == {"_data": "8263A1"}


def test_token_from_json_refuses_what_is_no_token():
    for value in (None, [], {}, "x"):
        with pytest.raises(ValueError):
            token_from_json(value)


# -- in process --------------------------------------------------------------------------------


async def test_a_quiet_stream_still_moves_its_saved_position_on(real_store, tmp_path, monkeypatch):
    """With no record changing, the saved token still follows the server: it does not age out of the oplog."""
    monkeypatch.setattr(watch, "IDLE_SAVE_EVERY", 0.0)
    resume = watch.ResumeFile(tmp_path / "pos", real_store.db.name)
    out, stop = io.StringIO(), asyncio.Event()
    follower = watch.Follower(real_store, out, as_json=True, resume=resume, stop=stop)
    task = asyncio.create_task(follower.run(None))
    try:
        first = await eventually(resume.load, what="the starting position saved")
        # Writes elsewhere in the database move the server's clock, not `records`.
        await real_store.sync_state.insert_one({"_id": "elsewhere"})
        await eventually(lambda: resume.load() != first, what="the saved position moved on")
        assert out.getvalue() == ""
        moved = resume.load()
    finally:
        stop.set()
        await task
    # The moved position is one the server resumes from.
    again = watch.Follower(real_store, out, as_json=True, resume=resume, stop=asyncio.Event())
    task = asyncio.create_task(again.run(moved))
    try:
        await real_store.write_batch([email_record("r1")])
        await eventually(lambda: out.getvalue(), what="a line")
        assert [json.loads(x)["_id"] for x in out.getvalue().splitlines()] == ["r1"]
    finally:
        again.stop.set()
        await task


async def test_a_replaced_record_is_an_update(real_store):
    await real_store.write_batch([email_record("r1")])
    async with real_store.record_changes() as changes:
        await real_store.records.replace_one({"_id": "r1"}, {**email_record("r1"), "subject": "replaced"})
        change = await eventually(changes.next, what="the change")
    assert (change.operation, change.record_id, change.record["subject"]) == ("update", "r1", "replaced")
