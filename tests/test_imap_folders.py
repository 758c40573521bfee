"""Folders on a real Dovecot that go missing, get renamed, or are restored from a backup."""

from __future__ import annotations

import asyncio
import json

from commsync.config import settings_from_dict
from commsync.daemon import app
from commsync.daemon.cli import main
from commsync.daemon.runner import Runner, StoreSink

from eventually import eventually
from mailgen import message


def settings_for(dovecot, user, **mailbox):
    box = dovecot.mailbox(user, addresses=[f"{user.name}@ourco.example"]) | mailbox
    return settings_from_dict({"mongodb": {"uri": "memory://"}, "mailboxes": [box]})


async def sync(settings, store):
    runner = Runner(app.build_connectors(settings, None), StoreSink(store), once=True, publish_status=True)
    ok = await runner.run()
    return ok, runner


async def sources_of(store, rid):
    return (await store.records.find_one({"_id": rid}))["sources"]


def test_check_fails_on_a_configured_folder_the_server_does_not_have(dovecot, imap_user, tmp_path, capsys):
    box = dovecot.mailbox(imap_user, folders=["INBOX", "Gone"])
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "mailboxes": [box]}))
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  imap " in out and "FolderMissing" in out and "'Gone'" in out


async def test_a_missing_folder_is_reported_and_skipped_while_the_others_capture(dovecot, imap_user, memory_store):
    dovecot.append(imap_user.name, "INBOX", message(1))
    # The missing folder comes first: it must cost neither INBOX nor IDLE.
    settings = settings_for(dovecot, imap_user, folders=["Gone", "INBOX"])
    ok, runner = await sync(settings, memory_store)
    assert ok and await memory_store.records.count_documents({}) == 1
    status = runner.status["m"]
    assert list(status.problems) == ["folder:Gone"] and "does not exist" in status.problems["folder:Gone"]
    assert (await memory_store.source_status("m"))["problems"] == status.problems

    (connector,) = app.build_connectors(settings, None)
    try:
        async for _ in connector.batches(await memory_store.load_state("m")):
            pass
        assert connector.idle_folder == "INBOX"
        waiting = asyncio.create_task(connector.wait_for_change(30))
        await eventually(lambda: connector._in_command, what="inside IDLE")
        await asyncio.sleep(0.3)  # deliberately: a busy loop over the missing folder would end the wait by now
        assert not waiting.done()
        dovecot.append(imap_user.name, "INBOX", message(2))
        assert await asyncio.wait_for(waiting, 10) is True
        # Created later, it is read and the problem clears.
        dovecot.append(imap_user.name, "Gone", message(3))
        for _ in range(2):  # the first pass reads what IDLE reported (INBOX); the next reads every folder
            async for _ in connector.batches({}):
                pass
        assert connector.problems == {}
    finally:
        await connector.aclose()


async def test_a_renamed_folder_is_read_again_and_its_old_name_retired(dovecot, imap_user, memory_store):
    for i in range(3):
        dovecot.append(imap_user.name, "Support", message(i))
    ok, _ = await sync(settings_for(dovecot, imap_user, folders=["INBOX", "Support"]), memory_store)
    assert ok and set(await memory_store.load_state("m")) == {"INBOX", "Support"}

    dovecot.doveadm("mailbox", "rename", "-u", imap_user.name, "Support", "Helpdesk")
    ok, _ = await sync(settings_for(dovecot, imap_user, folders=["INBOX", "Helpdesk"]), memory_store)
    assert ok
    assert await memory_store.records.count_documents({}) == 3  # nothing doubled
    assert set(await memory_store.load_state("m")) == {"INBOX", "Helpdesk"}  # the old checkpoint is gone
    for record in await memory_store.records.find().to_list(None):
        by_folder = {s["folder"]: s for s in record["sources"]}
        assert "gone_at" in by_folder["Support"] and "gone_at" not in by_folder["Helpdesk"]


async def test_a_folder_restored_from_a_backup_is_read_again_from_the_start(dovecot, imap_user, memory_store):
    for i in range(3):
        dovecot.append(imap_user.name, "Support", message(i))
    settings = settings_for(dovecot, imap_user, folders=["INBOX", "Support"])
    ok, _ = await sync(settings, memory_store)
    assert ok and (await memory_store.load_state("m"))["Support"]["last_uid"] == 3

    uidvalidity = dovecot.recreate_folder(imap_user.name, "Support")  # emptied, same UIDVALIDITY, UIDs from 1
    assert dovecot.append(imap_user.name, "Support", message(10)) == 1
    assert dovecot.append(imap_user.name, "Support", message(11)) == 2
    ok, runner = await sync(settings, memory_store)
    assert ok
    # Without the check, UIDs 1 and 2 sit below the checkpoint's last UID 3 and are skipped for ever.
    assert await memory_store.records.count_documents({}) == 5
    assert (await memory_store.load_state("m"))["Support"] == {"uidvalidity": uidvalidity, "last_uid": 2}
    problem = runner.status["m"].problems["restored:Support"]
    assert "UIDNEXT 3 at or below the checkpoint's last UID 3" in problem
    # The old UIDs name other messages now: their entries are marked gone.
    old = [r for r in await memory_store.records.find().to_list(None) if r["subject"].startswith(("Order 1000", "Order 1001", "Order 1002"))]
    assert len(old) == 3 and all(all("gone_at" in s for s in r["sources"]) for r in old)
