"""Real `commsync run` processes on a real MongoDB server, and what the tests around them need.

`DaemonProcess` starts the venv's console script in its own session with its
stderr (the JSON log) in a file; `MailStream` appends mail to Dovecot from a
thread and remembers where each message went (source, folder, UID); `Database`
reads what the daemons wrote with pymongo and checks the promises: every
message stored exactly once, checkpoints never past unstored mail, histories
equal to a rebuild. Everything polls (`wait_until`); nothing sleeps to
synchronise.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymongo

from commsync.connectors.mail import normalize_message_id
from commsync.daemon.store import Store

from mailgen import message

COMMSYNC = Path(sys.executable).with_name("commsync")


def wait_until(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str | Callable[[], str] = "") -> Any:
    """``check()``'s first truthy value; fail after ``timeout`` s (the sync twin of eventually.py).

    ``what`` says what was awaited; a callable is asked only on failure (a daemon's log tail then).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {(what() if callable(what) else what) or check}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, *, uri: str, database: str, mailboxes: list[dict], daemon: dict, **top: Any) -> Path:
    data = {"mongodb": {"uri": uri, "database": database, "server_selection_timeout": "2s"}, "daemon": daemon, "mailboxes": mailboxes, **top}
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


@dataclass
class HttpAnswer:
    status: int
    body: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


class DaemonProcess:
    """`commsync run -c CONFIG` through the console script, in its own session; its log in a file."""

    def __init__(self, name: str, config: Path, workdir: Path, *, http_port: int | None = None):
        self.name = name
        self.http_port = http_port
        self.log_path = workdir / f"{name}.stderr"
        with open(self.log_path, "wb") as err, open(workdir / f"{name}.stdout", "wb") as out:
            self.proc = subprocess.Popen(
                [str(COMMSYNC), "run", "-c", str(config)], stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
            )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def events(self) -> list[dict[str, Any]]:
        """Every complete JSON line of the log so far (anything else as ``{"event": "_raw"}``)."""
        out = []
        text = self.log_path.read_text(errors="replace")
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # being written
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "_raw", "line": line})
        return out

    def named(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    def tail(self, n: int = 20) -> str:
        return "\n".join(json.dumps(e)[:400] for e in self.events()[-n:])

    def get(self, path: str, timeout: float = 10.0) -> HttpAnswer:
        """GET ``path`` from the daemon's HTTP listener."""
        started = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout) as response:
                return HttpAnswer(response.status, response.read().decode(), time.monotonic() - started)
        except urllib.error.HTTPError as exc:
            return HttpAnswer(exc.code, exc.read().decode(), time.monotonic() - started)

    def listening(self) -> bool:
        try:
            return self.get("/metrics", timeout=2).status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, no goodbye: a crash."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code (SIGKILL if it hangs)."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not stop within {timeout}s:\n{self.tail()}") from None


def start_instances(
    names: list[str], *, uri: str, database: str, mailboxes: list[dict], workdir: Path, lease_ttl_s: float
) -> dict[str, DaemonProcess]:
    """One `commsync run` a name, all on ``mailboxes``, each with its HTTP listener; short timings for tests."""
    daemons = {}
    for name in names:
        port = free_port()
        config = write_config(
            workdir / f"{name}.yaml",
            uri=uri,
            database=database,
            mailboxes=mailboxes,
            log_level="debug",  # checkpoint_saved: who checkpointed what, when
            daemon={
                "poll_interval": "1s",
                "backoff_max": "2s",
                "lease_ttl": f"{lease_ttl_s:g}s",
                "parse_workers": 1,
                "shutdown_timeout": "10s",
                "instance": name,
                "http": {"listen": f"127.0.0.1:{port}"},
            },
        )
        daemons[name] = DaemonProcess(name, config, workdir, http_port=port)
    return daemons


def commsync(config: Path, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """A one-off `commsync` command (e.g. status) against ``config``."""
    return subprocess.run([str(COMMSYNC), *args, "-c", str(config)], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@dataclass(frozen=True)
class Appended:
    message_id: str  # normalized, as the record's _id
    source: str
    folder: str
    uid: int


class MailStream:
    """Appends one message every ``every`` s to the mailboxes in turn, from a thread.

    Every ``shared``-th message also goes to the next mailbox (a customer
    writing to two colleagues: one record, two sources) and every
    ``archived``-th to the same mailbox's Archive too (one record, two folders).
    Senders cycle through ``customers`` addresses.
    """

    def __init__(self, dovecot: Any, users: dict[str, Any], customers: list[str], *, every: float = 0.1, shared: int = 5, archived: int = 7):
        self.dovecot, self.users, self.customers = dovecot, users, customers
        self.every, self.shared, self.archived = every, shared, archived
        self.appended: list[Appended] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mail-stream", daemon=True)
        self._n = 0

    def start(self) -> MailStream:
        self._thread.start()
        return self

    def stop(self) -> list[Appended]:
        self._stop.set()
        self._thread.join(30)
        if self.errors:
            raise AssertionError(f"appending failed: {self.errors[0]!r}")
        return self.snapshot()

    def halt(self) -> None:
        """Stop appending, whatever happened (teardown)."""
        self._stop.set()
        self._thread.join(30)

    def snapshot(self) -> list[Appended]:
        with self._lock:
            return list(self.appended)

    def count(self) -> int:
        with self._lock:
            return len(self.appended)

    def _run(self) -> None:
        names = list(self.users)
        clients = {name: self.dovecot.client(self.users[name].name) for name in names}
        try:
            while not self._stop.is_set():
                n = self._n = self._n + 1
                home = names[n % len(names)]
                mid = f"<stream-{n}-{os.getpid()}@outage.test>"
                raw = message(n, sender=self.customers[n % len(self.customers)], message_id=mid)
                targets = [(home, "INBOX")]
                if n % self.shared == 0:
                    targets.append((names[(n + 1) % len(names)], "INBOX"))
                if n % self.archived == 0:
                    targets.append((home, "Archive"))
                for name, folder in targets:
                    uid = _append_uid(clients[name].append(folder, raw))
                    with self._lock:
                        self.appended.append(Appended(normalize_message_id(mid), name, folder, uid))
                self._stop.wait(self.every)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.errors.append(exc)
        finally:
            for client in clients.values():
                try:
                    client.logout()
                except Exception:  # noqa: BLE001 - the server may be gone at teardown
                    pass


def _append_uid(response: bytes) -> int:
    # [APPENDUID <uidvalidity> <uid>]
    text = response.decode() if isinstance(response, bytes) else str(response)
    return int(text.split("APPENDUID", 1)[1].split()[1].rstrip("]"))


class Database:
    """What the daemons stored, read with pymongo, and the checks of the capture promises."""

    def __init__(self, uri: str, name: str):
        self.uri, self.name = uri, name
        self.client = pymongo.MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=5000)
        self.db = self.client[name]

    def close(self) -> None:
        self.client.close()

    def seed_customers(self, n: int) -> list[str]:
        """``n`` customers, customer0@example.com ...; their addresses."""
        addresses = [f"customer{i}@example.com" for i in range(n)]
        self.db.customers.insert_many([{"_id": f"c{i}", "name": f"Customer {i}", "emails": [a]} for i, a in enumerate(addresses)])
        return addresses

    def lease_owners(self) -> dict[str, str]:
        """Source -> owner of every live lease."""
        now = datetime.now(UTC)
        return {d["_id"]: d["owner"] for d in self.db.leases.find() if d["expires_at"] > now}

    def records(self, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        query = {} if ids is None else {"_id": {"$in": list(ids)}}
        return {d["_id"]: d for d in self.db.records.find(query, {"sources": 1, "customer_ids": 1})}

    def checkpoints(self) -> dict[tuple[str, str], int]:
        """(source, folder) -> last_uid of every checkpoint."""
        return {(d["source"], d["stream"]): d["checkpoint"]["last_uid"] for d in self.db.sync_state.find()}

    def checkpoint_violations(self, appended: list[Appended]) -> list[str]:
        """Messages at or below their folder's checkpoint that are not stored (read the checkpoints first)."""
        checkpoints = self.checkpoints()
        covered = [a for a in appended if a.uid <= checkpoints.get((a.source, a.folder), 0)]
        stored = self.records({a.message_id for a in covered})
        return [
            f"{a.source}/{a.folder} uid {a.uid} ({a.message_id}) <= checkpoint {checkpoints[(a.source, a.folder)]}"
            for a in covered
            if not any(s.get("source") == a.source and s.get("folder") == a.folder and s.get("uid") == a.uid for s in stored.get(a.message_id, {}).get("sources", ()))
        ]

    def missing(self, appended: list[Appended]) -> list[Appended]:
        """Appended messages whose record lacks the source entry of where they were appended."""
        stored = self.records({a.message_id for a in appended})
        return [
            a
            for a in appended
            if not any(s.get("source") == a.source and s.get("folder") == a.folder and s.get("uid") == a.uid for s in stored.get(a.message_id, {}).get("sources", ()))
        ]

    def exactly_once_problems(self, appended: list[Appended]) -> list[str]:
        """Every appended message stored once, its record naming each place it was appended exactly once."""
        wanted: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        for a in appended:
            wanted[a.message_id].append((a.source, a.folder, a.uid))
        problems = []
        ids = list(wanted)
        counts = {d["_id"]: d["n"] for d in self.db.records.aggregate([{"$match": {"_id": {"$in": ids}}}, {"$group": {"_id": "$_id", "n": {"$sum": 1}}}])}
        stored = self.records(ids)
        for mid, places in wanted.items():
            if counts.get(mid) != 1:
                problems.append(f"{mid}: {counts.get(mid, 0)} records")
                continue
            got = sorted((s.get("source"), s.get("folder"), s.get("uid")) for s in stored[mid].get("sources", ()))
            if got != sorted(places):
                problems.append(f"{mid}: sources {got}, appended to {sorted(places)}")
        others = self.db.records.count_documents({"_id": {"$nin": ids}})
        if others:
            problems.append(f"{others} records of messages never appended")
        return problems

    def history_differences(self) -> list[str]:
        """Stored customer histories against a rebuild from the records (``updated_at`` aside)."""
        rebuilt, stored = asyncio.run(_rebuild_and_read(self.uri, self.name))
        if not rebuilt:
            return ["no history at all: the test matched no customer"]
        problems = []
        for cid in sorted(set(rebuilt) | set(stored), key=str):
            want = {k: v for k, v in rebuilt.get(cid, {}).items() if k != "updated_at"}
            got = {k: v for k, v in stored.get(cid, {}).items() if k != "updated_at"}
            if want != got:
                problems.append(f"customer {cid}: stored {got} != rebuilt {want}")
        return problems


async def _rebuild_and_read(uri: str, name: str) -> tuple[dict[Any, dict[str, Any]], dict[Any, dict[str, Any]]]:
    store = Store.connect(uri, name)
    try:
        return await store.rebuild_history(), await store.stored_histories()
    finally:
        store.close()


def foreign_checkpoints(*daemons: DaemonProcess) -> list[str]:
    """Checkpoints saved by an instance after another one took the source's lease (needs debug logs).

    Merged by time, each ``checkpoint_saved`` must come from whoever acquired the
    source's lease last: one instance at a time works a source.
    """
    merged = []
    for d in daemons:
        for e in d.events():
            if e.get("event") in ("lease_acquired", "checkpoint_saved"):
                merged.append((e["timestamp"], d.name, e))
    merged.sort(key=lambda t: t[0])
    last_owner: dict[str, str] = {}
    problems = []
    for at, name, e in merged:
        source = e["source"]
        if e["event"] == "lease_acquired":
            last_owner[source] = name
        elif last_owner.get(source) != name:
            problems.append(f"{at} {name} checkpointed {source}/{e['stream']} {e['checkpoint']} while {last_owner.get(source)} held it")
    return problems
