"""IMAP IDLE against the real Dovecot: push latency, renewal, fallback, and a server that goes away."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import imapclient.exceptions
import pytest

from commsync.config import settings_from_dict
from commsync.daemon import app
from commsync.daemon.retry import RetryPolicy
from commsync.daemon.runner import Runner, StoreSink

from eventually import eventually
from mailgen import message
from tcp_proxy import TcpProxy


def settings(dovecot, user, **mailbox):
    box = dovecot.mailbox(user, addresses=[f"{user.name}@ourco.example"]) | mailbox
    return settings_from_dict({"mongodb": {"uri": "memory://"}, "mailboxes": [box]})


def connector_for(dovecot, user, **mailbox):
    (connector,) = app.build_connectors(settings(dovecot, user, **mailbox), None)
    return connector


async def drain(connector, state=None):
    """One pass by hand; returns the records read."""
    records = []
    async for batch in connector.batches(state or {}):
        records += batch.records
    return records


async def count_is(store, n):
    return await store.records.count_documents({}) == n


def spy_idle(connector):
    """Count the IDLE commands the connector issues (the real method still runs)."""
    calls = []
    real = connector._idle_blocking

    def counting(client, seconds, stop, *folder):
        calls.append(seconds)
        return real(client, seconds, stop, *folder)

    connector._idle_blocking = counting
    return calls


async def test_appended_message_is_captured_through_idle(dovecot, imap_user, memory_store):
    dovecot.append(imap_user.name, "INBOX", message(1))
    # Ten minutes between polls: only the server's push can bring the next message in time.
    runner = Runner(
        app.build_connectors(settings(dovecot, imap_user), None), StoreSink(memory_store), poll_interval=timedelta(minutes=10)
    )
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: memory_store.records.count_documents({}), what="first pass")
        await eventually(lambda: runner.status["m"].state == "waiting")
        started = time.monotonic()
        await asyncio.to_thread(dovecot.append, imap_user.name, "INBOX", message(2))
        await eventually(lambda: memory_store.records.count_documents({"subject": {"$regex": "^Order 1002"}}), timeout=30)
        latency = time.monotonic() - started
        # Typically ~0.5 s on loopback, Dovecot's own notification delay (tests/bench_idle.py).
        assert latency < 5, latency
        # Every configured folder is watched (NOTIFY): new mail in Sent arrives as fast.
        await eventually(lambda: runner.status["m"].state == "waiting")
        started = time.monotonic()
        await asyncio.to_thread(dovecot.append, imap_user.name, "Sent", message(50, sender=f"{imap_user.name}@ourco.example"))
        await eventually(lambda: memory_store.records.count_documents({"sources.folder": "Sent"}), timeout=30)
        assert time.monotonic() - started < 5
        state = await memory_store.load_state("m")
        assert state["INBOX"]["last_uid"] == 2 and state["Sent"]["last_uid"] == 1
    finally:
        runner.stop()
        assert await asyncio.wait_for(task, 15) is True


@pytest.mark.parametrize("offered", ["LIST-STATUS", "STATUS only"])
async def test_without_notify_the_other_folders_are_checked_cheaply(dovecot, imap_user, offered):
    """IDLE on INBOX, and one LIST-STATUS (or a STATUS per folder) of the others every check_every seconds."""
    connector = connector_for(dovecot, imap_user, folders=["INBOX", "Sent", "Archive"])
    connector.check_every = 0.5
    hidden = {"NOTIFY"} | ({"LIST-STATUS"} if offered == "STATUS only" else set())
    commands = []
    try:
        await drain(connector)
        client = connector._client
        real_has, real_status = client.has_capability, client.folder_status
        client.has_capability = lambda name: name not in hidden and real_has(name)
        client.folder_status = lambda *a, **k: commands.append("STATUS") or real_status(*a, **k)
        waiting = asyncio.create_task(connector.wait_for_change(30))
        await eventually(lambda: connector._in_command, what="inside IDLE")
        dovecot.append(imap_user.name, "Archive", message(3))
        assert await asyncio.wait_for(waiting, 10) is True
        assert connector._wake == ["Archive"]
        # With LIST-STATUS one command covers both other folders; without it, one STATUS each.
        assert (commands == []) if offered == "LIST-STATUS" else (len(commands) >= 2)
        assert [r["sources"][0]["folder"] for r in await drain(connector, {"INBOX": {}, "Sent": {}})] == ["Archive"]
    finally:
        await connector.aclose()


async def test_idle_is_reissued_and_still_reports_mail(dovecot, imap_user):
    connector = connector_for(dovecot, imap_user, idle_renew="1s", folders=["INBOX"])
    calls = spy_idle(connector)
    try:
        await drain(connector)
        waiting = asyncio.create_task(connector.wait_for_change(30))
        await eventually(lambda: len(calls) >= 3, what="IDLE re-issued")
        assert not waiting.done()
        dovecot.append(imap_user.name, "INBOX", message(1))
        assert await asyncio.wait_for(waiting, 15) is True
        assert all(seconds <= 1 for seconds in calls)
        assert [r["subject"][:10] for r in await drain(connector)] == ["Order 1001"]
    finally:
        await connector.aclose()


async def test_mail_that_arrived_before_idle_is_not_slept_through(dovecot, imap_user):
    connector = connector_for(dovecot, imap_user, folders=["INBOX"])
    calls = spy_idle(connector)
    try:
        await drain(connector)
        dovecot.append(imap_user.name, "INBOX", message(1))
        # Between the scan and the IDLE: UIDNEXT moved, so no IDLE at all.
        assert await asyncio.wait_for(connector.wait_for_change(30), 10) is True
        assert calls == []
    finally:
        await connector.aclose()


async def test_idle_false_polls_only(dovecot, imap_user):
    connector = connector_for(dovecot, imap_user, idle=False, folders=["INBOX"])
    calls = spy_idle(connector)
    try:
        await drain(connector)
        waiting = asyncio.create_task(connector.wait_for_change(0.5))
        dovecot.append(imap_user.name, "INBOX", message(1))
        assert await waiting is False
        assert calls == []
        assert len(await drain(connector, {})) == 1
    finally:
        await connector.aclose()


async def test_stop_interrupts_idle_promptly(dovecot, imap_user, memory_store):
    runner = Runner(
        app.build_connectors(settings(dovecot, imap_user, folders=["INBOX"]), None),
        StoreSink(memory_store),
        poll_interval=timedelta(minutes=10),
    )
    task = asyncio.create_task(runner.run())
    await eventually(lambda: runner.status["m"].state == "waiting")
    await eventually(lambda: runner.connector("m")._in_command, what="inside IDLE")
    runner.stop()
    # One IDLE slice (1 s) at most, not the ten-minute poll interval.
    assert await asyncio.wait_for(task, 10) is True


async def test_a_quiet_idle_does_not_wake_up_until_the_server_speaks(dovecot, imap_user):
    # Each wakeup costs CPU: at hundreds of mailboxes a wakeup a second each is a good
    # part of a core (tests/bench_many.py). A quiet wait is one blocking read.
    connector = connector_for(dovecot, imap_user)  # INBOX and Sent: IDLE with NOTIFY
    try:
        await drain(connector)
        client = connector._client
        reads = []
        real = client.idle_check
        client.idle_check = lambda timeout=None: reads.append(timeout) or real(timeout)
        assert await connector.wait_for_change(3.0) is False
        assert len(reads) == 1 and reads[0] > 2.5, reads
        # Mail still wakes it at once.
        waiting = asyncio.create_task(connector.wait_for_change(30))
        await eventually(lambda: len(reads) == 2, what="inside IDLE")
        dovecot.append(imap_user.name, "Sent", message(7))
        assert await asyncio.wait_for(waiting, 10) is True
        assert connector._wake == ["Sent"]
    finally:
        await connector.aclose()


async def test_a_cancelled_idle_returns_at_once_and_the_next_pass_logs_in_again(dovecot, imap_user):
    connector = connector_for(dovecot, imap_user)
    try:
        await drain(connector)
        first = connector._client
        waiting = asyncio.create_task(connector.wait_for_change(600))
        await eventually(lambda: connector._in_command, what="inside IDLE")
        started = time.monotonic()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert time.monotonic() - started < 2
        # The connection was cut; the connector's thread is free again and the next pass reconnects.
        await eventually(lambda: not connector._in_command, timeout=5, what="the IDLE thread returned")
        dovecot.append(imap_user.name, "INBOX", message(8))
        assert [r["subject"][:10] for r in await drain(connector)] == ["Order 1008"]
        assert connector._client is not None and connector._client is not first
        assert await connector.wait_for_change(0.5) is False
    finally:
        await connector.aclose()


async def test_server_going_away_and_coming_back(dovecot, imap_user, memory_store):
    with TcpProxy(dovecot.host, dovecot.port) as proxy:
        for i in range(2):
            dovecot.append(imap_user.name, "INBOX", message(i))
        runner = Runner(
            app.build_connectors(settings(dovecot, imap_user, port=proxy.port, folders=["INBOX"]), None),
            StoreSink(memory_store),
            poll_interval=timedelta(minutes=10),
            policy=RetryPolicy(backoff_max=timedelta(seconds=1)),
        )
        task = asyncio.create_task(runner.run())
        try:
            await eventually(lambda: runner.status["m"].state == "waiting" and runner.status["m"].records == 2)
            proxy.cut()  # the IDLE connection drops and reconnecting is refused
            dovecot.append(imap_user.name, "INBOX", message(2))
            await eventually(lambda: runner.status["m"].failures >= 2, what="reconnects failing with backoff")
            assert "ConnectionRefusedError" in runner.status["m"].last_error
            assert await memory_store.records.count_documents({}) == 2
            proxy.restore()
            await eventually(lambda: count_is(memory_store, 3), timeout=20)
            await eventually(lambda: runner.status["m"].failures == 0)
            assert (await memory_store.load_state("m"))["INBOX"]["last_uid"] == 3
            for record in await memory_store.records.find().to_list(None):
                assert len(record["sources"]) == 1
            # Back in IDLE on the new connection: push works again.
            await eventually(lambda: runner.status["m"].state == "waiting")
            dovecot.append(imap_user.name, "INBOX", message(3))
            await eventually(lambda: count_is(memory_store, 4), timeout=20)
            assert proxy.connections >= 2
        finally:
            runner.stop()
            assert await asyncio.wait_for(task, 15) is True


async def test_a_refused_notify_falls_back_instead_of_spinning(dovecot, imap_user, monkeypatch):
    """A server that answers BAD to NOTIFY: the wait goes on without it, it does not return at once pass after pass."""
    from commsync.connectors import imap_extensions

    connector = connector_for(dovecot, imap_user, folders=["INBOX", "Sent"])
    connector.check_every = 0.2

    def refused(client, others):
        raise imapclient.exceptions.IMAPClientError("NOTIFY command error: BAD [b'Error in IMAP command NOTIFY']")

    monkeypatch.setattr(imap_extensions, "notify_set", refused)
    try:
        await drain(connector)
        started = time.monotonic()
        assert await connector.wait_for_change(1.0) is False
        assert time.monotonic() - started >= 0.9  # waited, not a pass loop
        # Without NOTIFY from now on: IDLE plus the cheap check still finds mail in Sent.
        waiting = asyncio.create_task(connector.wait_for_change(10))
        await eventually(lambda: connector._in_command, what="inside IDLE")
        dovecot.append(imap_user.name, "Sent", message(7))
        assert await asyncio.wait_for(waiting, 10) is True and connector._wake == ["Sent"]
    finally:
        await connector.aclose()


async def test_a_refused_notify_none_keeps_the_mail_it_found_and_drops_the_connection(dovecot, imap_user):
    """NOTIFY NONE answered BAD after the wait found mail: the wait reports it at once, the next pass reconnects."""
    connector = connector_for(dovecot, imap_user)  # INBOX and Sent: IDLE with NOTIFY
    try:
        await drain(connector)
        client = connector._client
        real = client._imap._simple_command

        def refusing(name, *args):
            if name == "NOTIFY" and args[:1] == ("NONE",):
                raise imapclient.exceptions.IMAPClientError("NOTIFY command error: BAD [b'Error in IMAP command NOTIFY']")
            return real(name, *args)

        client._imap._simple_command = refusing
        dovecot.append(imap_user.name, "Sent", message(9))
        # Not the deadline (60 s): the mail NOTIFY SET reported stands.
        assert await asyncio.wait_for(connector.wait_for_change(60), 10) is True
        assert connector._wake == ["Sent"]
        assert connector._client is None  # dropped: its notifications could not be stopped
        assert [r["subject"][:10] for r in await drain(connector)] == ["Order 1009"]
        assert connector._client is not None and connector._client is not client
    finally:
        await connector.aclose()
