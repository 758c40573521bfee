"""IMAP capture against a real Dovecot: the daemon's own code end to end, into the store."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from commsync.config import settings_from_dict
from commsync.daemon import app
from commsync.daemon.cli import main
from commsync.daemon.runner import Runner

from eventually import eventually
from mailgen import message
from seed import CORPUS, CORPUS_FILES
from sinks import CountingSink, CrashingSink


def settings_for(dovecot, *users, capture=None, **mailbox):
    boxes = []
    for n, user in enumerate(users):
        name = mailbox.pop("name", None) or f"box{n}"
        boxes.append(dovecot.mailbox(user, name=name, addresses=[f"{user.name}@ourco.example"]) | mailbox)
    return settings_from_dict(
        {
            "mongodb": {"uri": "memory://"},
            "internal_domains": ["ourco.example"],
            "mailboxes": boxes,
            "daemon": {"parse_workers": 2},
            "capture": capture or {},
        }
    )


async def sync(settings, store, executor=None, sink=None):
    sink = sink or CountingSink(store)
    runner = Runner(app.build_connectors(settings, executor), sink, once=True)
    ok = await runner.run()
    return ok, runner, sink


async def test_first_sync_incremental_and_checkpoints(dovecot, imap_user, memory_store):
    await memory_store.customers.insert_one({"_id": "c-alice", "emails": ["Alice@Example.com"]})
    for i in range(5):
        dovecot.append(imap_user.name, "INBOX", message(i))
    dovecot.append(imap_user.name, "Sent", message(99, sender=f"{imap_user.name}@ourco.example", to="alice@example.com"))
    settings = settings_for(dovecot, imap_user)

    ok, runner, sink = await sync(settings, memory_store)
    assert ok, runner.status
    assert await memory_store.records.count_documents({}) == 6
    state = await memory_store.load_state("box0")
    assert set(state) == {"INBOX", "Sent"}  # Sent found through SPECIAL-USE
    assert state["INBOX"]["last_uid"] == 5
    hist = await memory_store.history.find_one({"_id": "c-alice"})
    assert (hist["total"], hist["inbound"], hist["outbound"]) == (6, 5, 1)

    new_uid = dovecot.append(imap_user.name, "INBOX", message(6))
    ok, _, sink = await sync(settings, memory_store)
    assert ok
    # Only the new message was fetched and stored.
    assert [b for b in sink.batches if b[2]] == [("box0", "INBOX", 1, 0)]
    assert (await memory_store.load_state("box0"))["INBOX"]["last_uid"] == new_uid
    assert (await memory_store.history.find_one({"_id": "c-alice"}))["total"] == 7


async def test_records_carry_the_contract_fields(dovecot, imap_user, memory_store):
    raw = message(1, subject="=?utf-8?q?Angebot_f=C3=BCr_Paletten?=", html=True, attachment=b"%PDF-1.4 test")
    uid = dovecot.append(imap_user.name, "INBOX", raw)
    await sync(settings_for(dovecot, imap_user), memory_store)
    rec = await memory_store.records.find_one({})
    assert rec["channel"] == "email" and rec["direction"] == "inbound"
    assert rec["subject"] == "Angebot für Paletten"
    assert rec["occurred_at"] == datetime(2025, 1, 1, 0, 1, tzinfo=UTC)
    assert rec["attachments"][0]["filename"] == "invoice-1.pdf"
    assert rec["sources"] == [{"kind": "imap", "source": "box0", "folder": "INBOX", "uidvalidity": rec["sources"][0]["uidvalidity"], "uid": uid}]
    assert rec["ingested_at"].tzinfo is not None
    assert "Hello" in rec["content"]


async def test_flags_are_unchanged_by_capture(dovecot, imap_user, memory_store):
    unread = dovecot.append(imap_user.name, "INBOX", message(1))
    flagged = dovecot.append(imap_user.name, "INBOX", message(2), flags=[b"\\Flagged"])
    await sync(settings_for(dovecot, imap_user), memory_store)
    client = dovecot.client(imap_user.name)
    client.select_folder("INBOX", readonly=True)
    flags = client.get_flags([unread, flagged])
    client.logout()
    # \Recent belongs to the session, not the user; everything else must be as the user left it.
    assert set(flags[unread]) - {b"\\Recent"} == set()
    assert set(flags[flagged]) - {b"\\Recent"} == {b"\\Flagged"}


async def test_uidvalidity_change_resyncs_without_duplicates(dovecot, imap_user, memory_store):
    for i in range(4):
        dovecot.append(imap_user.name, "INBOX", message(i))
    settings = settings_for(dovecot, imap_user)
    await sync(settings, memory_store)
    old = (await memory_store.load_state("box0"))["INBOX"]["uidvalidity"]
    new = dovecot.reset_uidvalidity(imap_user.name, "INBOX")
    assert new != old
    ok, _, sink = await sync(settings, memory_store)
    assert ok
    assert sum(b[2] for b in sink.batches) == 4  # the folder was read again
    assert await memory_store.records.count_documents({}) == 4
    for rec in await memory_store.records.find().to_list(None):
        # Where it was seen under the old UIDVALIDITY stays, marked gone; where it is now is live.
        assert [(s["uidvalidity"], "gone_at" in s) for s in rec["sources"]] == [(old, True), (new, False)]
    assert (await memory_store.load_state("box0"))["INBOX"]["uidvalidity"] == new


async def test_same_message_id_in_inbox_and_sent_is_one_record(dovecot, imap_user, memory_store):
    raw = message(7, sender=f"{imap_user.name}@ourco.example", to="bob@example.org", message_id="<same@ourco.example>")
    dovecot.append(imap_user.name, "INBOX", raw)
    dovecot.append(imap_user.name, "Sent", raw)
    await sync(settings_for(dovecot, imap_user), memory_store)
    recs = await memory_store.records.find().to_list(None)
    assert len(recs) == 1
    assert recs[0]["_id"] == "same@ourco.example"
    assert recs[0]["direction"] == "outbound"
    assert sorted(s["folder"] for s in recs[0]["sources"]) == ["INBOX", "Sent"]


async def test_same_message_in_two_mailboxes_is_one_record(dovecot, memory_store):
    a, b = dovecot.new_user("a"), dovecot.new_user("b")
    raw = message(3, to="a@ourco.example, b@ourco.example")
    dovecot.append(a.name, "INBOX", raw)
    dovecot.append(b.name, "INBOX", raw)
    ok, _, _ = await sync(settings_for(dovecot, a, b), memory_store)
    assert ok
    rec = await memory_store.records.find_one({})
    assert await memory_store.records.count_documents({}) == 1
    assert sorted(s["source"] for s in rec["sources"]) == ["box0", "box1"]


async def test_crash_between_store_and_checkpoint_loses_and_doubles_nothing(dovecot, imap_user, memory_store):
    await memory_store.customers.insert_one({"_id": "c", "emails": ["alice@example.com"]})
    for i in range(7):
        dovecot.append(imap_user.name, "INBOX", message(i))
    settings = settings_for(dovecot, imap_user, batch_size=3, folders=["INBOX"])
    ok, runner, _ = await sync(settings, memory_store, sink=CrashingSink(memory_store, after=1))
    assert not ok and "injected" in runner.status["box0"].last_error
    assert (await memory_store.load_state("box0"))["INBOX"]["last_uid"] == 3
    assert await memory_store.records.count_documents({}) == 6

    ok, _, _ = await sync(settings, memory_store)
    assert ok
    assert await memory_store.records.count_documents({}) == 7
    for rec in await memory_store.records.find().to_list(None):
        assert len(rec["sources"]) == 1
    hist = await memory_store.history.find_one({"_id": "c"})
    assert hist["total"] == 7
    rebuilt = (await memory_store.rebuild_history())["c"]
    assert {k: v for k, v in hist.items() if k != "updated_at"} == {k: v for k, v in rebuilt.items() if k != "updated_at"}


async def test_since_limits_the_first_sync(dovecot, imap_user, memory_store):
    dovecot.append(imap_user.name, "INBOX", message(1), msg_time=datetime(2020, 5, 1, tzinfo=UTC))
    dovecot.append(imap_user.name, "INBOX", message(2), msg_time=datetime(2025, 5, 1, tzinfo=UTC))
    await sync(settings_for(dovecot, imap_user, since="2024-01-01", folders=["INBOX"]), memory_store)
    assert await memory_store.records.count_documents({}) == 1


async def test_huge_message_is_capped_not_fatal(dovecot, imap_user, memory_store):
    big = message(1, attachment=b"x" * 400_000)
    dovecot.append(imap_user.name, "INBOX", big)
    dovecot.append(imap_user.name, "INBOX", message(2))
    settings = settings_for(dovecot, imap_user, folders=["INBOX"], capture={"max_message_bytes": 65536})
    ok, _, _ = await sync(settings, memory_store)
    assert ok
    recs = {r["subject"].split(":")[0]: r for r in await memory_store.records.find().to_list(None)}
    assert recs["Order 1001"]["content_truncated"] is True
    assert recs["Order 1002"]["content_truncated"] is False


async def test_tls_is_verified_by_default(dovecot, imap_user, memory_store):
    tls = {"security": "tls", "port": dovecot.tls_port, "folders": ["INBOX"]}
    dovecot.append(imap_user.name, "INBOX", message(1))
    ok, runner, _ = await sync(settings_for(dovecot, imap_user, **tls), memory_store)
    assert not ok and "CERTIFICATE_VERIFY_FAILED" in runner.status["box0"].last_error
    ok, runner, _ = await sync(settings_for(dovecot, imap_user, ca_file=dovecot.ca_file, **tls), memory_store)
    assert ok, runner.status
    starttls = {"security": "starttls", "port": dovecot.port, "ca_file": dovecot.ca_file, "folders": ["INBOX"]}
    ok, runner, _ = await sync(settings_for(dovecot, imap_user, **starttls), memory_store)
    assert ok, runner.status
    assert await memory_store.records.count_documents({}) == 1


async def test_mailboxes_share_one_tls_context(dovecot):
    """Loading the CA bundle costs about 1 MB per context: a hundred mailboxes must not each pay it."""
    users = [dovecot.new_user("tls") for _ in range(3)]
    tls = {"security": "tls", "port": dovecot.tls_port, "ca_file": dovecot.ca_file, "folders": ["INBOX"]}
    connectors = app.build_connectors(settings_for(dovecot, *users, **tls), None)
    try:
        for connector in connectors:
            await connector.check()
        contexts = {id(c._client.socket().context) for c in connectors}
        assert len(contexts) == 1
    finally:
        for connector in connectors:
            await connector.aclose()


async def test_wrong_password_fails_that_mailbox_only(dovecot, memory_store):
    good, bad = dovecot.new_user("good"), dovecot.new_user("bad")
    dovecot.append(good.name, "INBOX", message(1))
    settings = settings_for(dovecot, good, type(bad)(bad.name, "wrong-password"))
    ok, runner, _ = await sync(settings, memory_store)
    assert not ok
    assert "CredentialsRefused" in runner.status["box1"].last_error
    assert "wrong-password" not in runner.status["box1"].last_error
    assert runner.status["box0"].last_error is None
    assert await memory_store.records.count_documents({}) == 1


async def test_process_pool_parsing(dovecot, imap_user, memory_store):
    for i in range(30):
        dovecot.append(imap_user.name, "INBOX", message(i, html=bool(i % 2)))
    settings = settings_for(dovecot, imap_user, folders=["INBOX"], batch_size=8)
    with app.parse_pool(settings) as pool:
        ok, _, sink = await sync(settings, memory_store, executor=pool)
    assert ok
    assert [b[2] for b in sink.batches] == [8, 8, 8, 6]
    assert await memory_store.records.count_documents({}) == 30


@pytest.mark.skipif(not CORPUS_FILES, reason=f"email corpus not found at {CORPUS} (set COMMSYNC_CORPUS_DIR)")
async def test_every_corpus_message_survives_a_real_sync(dovecot, imap_user, memory_store):
    appended = 0
    client = dovecot.client(imap_user.name)
    client.create_folder("Corpus")
    refused = []
    for path in CORPUS_FILES:
        try:
            client.append("Corpus", path.read_bytes())
            appended += 1
        except Exception as exc:  # the server's own limits (e.g. bare NULs), not ours
            refused.append((path.name, str(exc)))
    client.logout()
    assert appended >= len(CORPUS_FILES) * 0.9, refused
    ok, runner, sink = await sync(settings_for(dovecot, imap_user, folders=["Corpus"], batch_size=40), memory_store)
    assert ok, runner.status
    stored = sum(b[2] for b in sink.batches)
    skipped = sum(b[3] for b in sink.batches)
    assert stored + skipped == appended
    assert skipped == 0
    # Corpus messages share Message-IDs in places: records are per distinct id.
    assert await memory_store.records.count_documents({}) <= stored
    assert await memory_store.records.count_documents({"occurred_at": None}) == 0


def test_cli_dry_run_prints_records_and_writes_nothing(dovecot, imap_user, tmp_path, capsys):
    for i in range(3):
        dovecot.append(imap_user.name, "INBOX", message(i))
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                # An unreachable MongoDB proves the dry run never connects to it.
                "mongodb": {"uri": "mongodb://127.0.0.1:9", "server_selection_timeout": "1s"},
                "mailboxes": [
                    dovecot.mailbox(imap_user, folders=["INBOX"])
                ],
            }
        )
    )
    assert main(["run", "--once", "--dry-run", "-c", str(config)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    assert {r["channel"] for r in lines} == {"email"}


def test_cli_check_reports_each_item(dovecot, imap_user, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "mongodb": {"uri": "memory://"},
                "mailboxes": [
                    dovecot.mailbox(imap_user, name="ok"),
                    dovecot.mailbox(imap_user, name="nope", password="bad"),
                ],
            }
        )
    )
    assert main(["check", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert "ok    mongodb" in out
    assert "ok    imap ok" in out and "login ok" in out
    assert "FAIL  imap nope" in out and "CredentialsRefused" in out


async def test_batches_are_bounded_by_bytes_as_well_as_count(dovecot, imap_user, memory_store):
    sizes = [len(message(i, attachment=bytes(200_000))) for i in range(6)]
    for i in range(6):
        dovecot.append(imap_user.name, "INBOX", message(i, attachment=bytes(200_000)))
    budget = 1024 * 1024
    settings = settings_for(dovecot, imap_user, folders=["INBOX"], batch_size=500, capture={"max_batch_bytes": budget})
    ok, _, sink = await sync(settings, memory_store)
    assert ok
    counts = [b[2] for b in sink.batches]
    assert sum(counts) == 6 and len(counts) > 1
    start = 0
    for n in counts:
        assert sum(sizes[start : start + n]) <= budget
        start += n


async def test_a_message_that_kills_a_parse_worker_is_skipped_and_the_pool_recovers(dovecot, imap_user, memory_store):
    """A worker killed mid-parse (OOM killer, a crash in C code) costs that message, not the mailbox."""
    from parser_poison import PoisonedPool

    for i in range(5):
        dovecot.append(imap_user.name, "INBOX", message(i, subject="KILL-THE-PARSER please" if i == 2 else None))
    settings = settings_for(dovecot, imap_user, folders=["INBOX"])
    pool = PoisonedPool(2, b"KILL-THE-PARSER")
    try:
        ok, runner, sink = await sync(settings, memory_store, executor=pool)
        assert ok, runner.status
        assert sum(b[2] for b in sink.batches) == 4 and sum(b[3] for b in sink.batches) == 1
        # Not dropped silently: it waits in quarantine, with its UID and why.
        (entry,) = await memory_store.quarantine_list()
        assert (entry["source"], entry["stream"], entry["item_id"]) == ("box0", "INBOX", 3)
        assert entry["reason"] == "the parser process died on this message" and entry["attempts"] == 1
        # The pool was replaced, and the next pass parses on it as usual.
        dovecot.append(imap_user.name, "INBOX", message(9))
        ok, _, sink = await sync(settings, memory_store, executor=pool)
        assert ok and sum(b[2] for b in sink.batches) == 1
    finally:
        pool.shutdown()
    assert await memory_store.records.count_documents({}) == 5


async def test_closing_does_not_wait_for_a_server_that_stopped_answering(dovecot, imap_user):
    """A stop (or a lease handed over) must not hang behind a command stuck in the mailbox's thread."""
    import asyncio
    import time

    from tcp_proxy import TcpProxy

    with TcpProxy(dovecot.host, dovecot.port) as proxy:
        settings = settings_for(dovecot, imap_user, port=proxy.port, folders=["INBOX"], timeout="60s")
        (connector,) = app.build_connectors(settings, None)
        await connector.check()  # logged in through the proxy
        proxy.stall()
        batches = connector.batches({})
        stuck = asyncio.ensure_future(anext(batches))
        await eventually(lambda: connector._in_command, what="the NOOP that checks the connection waits for an answer")
        assert not stuck.done()
        started = time.monotonic()
        stuck.cancel()  # as the runner does on a stop; the generator's cleanup drops the connection
        await asyncio.wait_for(asyncio.gather(stuck, connector.aclose(), return_exceptions=True), 30)
        assert time.monotonic() - started < 5  # not the 60 s socket timeout


class HangUpOnLogin:
    """An IMAP server that greets, then drops the connection when LOGIN comes: a network blip mid-login."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.logins = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n")
                for line in lines:
                    tag, _, command = line.partition(b" ")
                    if command.upper().startswith(b"LOGIN"):
                        self.logins += 1
                        break  # hang up instead of answering
                    if command.upper().startswith(b"CAPABILITY"):
                        conn.sendall(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
                    else:
                        conn.sendall(tag + b" BAD not here\r\n")

    def close(self):
        self.sock.close()


async def test_a_connection_dropped_during_login_is_an_outage_not_a_refusal(memory_store):
    server = HangUpOnLogin()
    try:
        settings = settings_from_dict(
            {"mongodb": {"uri": "memory://"}, "mailboxes": [{"name": "blip", "host": "127.0.0.1", "port": server.port, "security": "none", "username": "u", "password": "p"}]}
        )
        ok, runner, _ = await sync(settings, memory_store)
        assert not ok and server.logins == 1
        error = runner.status["blip"].last_error
        assert error.startswith("TemporarilyUnavailable: connection lost during login"), error
        assert runner.status["blip"].refusals == 0 and runner.status["blip"].refused_since is None
    finally:
        server.close()
